// msd_engine._C: the C API as Python functions. Pointers travel as integers (tensor.data_ptr()),
// dtypes as the ints exported below; a non-OK status raises ValueError (caller's mistake),
// MemoryError, or RuntimeError (CUDA failure, CUDA not compiled) carrying
// msd_last_error_message().
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "msd_engine.h"

namespace py = pybind11;

namespace {

void raise_if_failed(msd_status status) {
    if (status == MSD_OK) return;
    const std::string message =
        std::string(msd_status_string(status)) + ": " + msd_last_error_message();
    if (status == MSD_ERR_INVALID_ARGUMENT || status == MSD_ERR_UNSUPPORTED_DTYPE) {
        throw py::value_error(message);
    }
    if (status == MSD_ERR_OUT_OF_MEMORY) {
        PyErr_SetString(PyExc_MemoryError, message.c_str());
        throw py::error_already_set();
    }
    throw std::runtime_error(message);
}

// How each C parameter type is spelled on the Python side.
template <class T>
struct PyArg {
    using type = T;
    static T from(T v) { return v; }
};
template <class T>
struct PyArg<T*> {  // every pointer but the layer's: an integer address
    using type = uintptr_t;
    static T* from(uintptr_t p) { return reinterpret_cast<T*>(p); }
};
template <>
struct PyArg<const msd_decoder_layer*> {  // a _C.DecoderLayer, built once per layer
    using type = const msd_decoder_layer&;
    static const msd_decoder_layer* from(const msd_decoder_layer& layer) { return &layer; }
};
template <>
struct PyArg<const msd_draft_head*> {  // a _C.DraftHead, built once per drafter
    using type = const msd_draft_head&;
    static const msd_draft_head* from(const msd_draft_head& head) { return &head; }
};
template <>
struct PyArg<msd_dtype> {
    using type = int;
    static msd_dtype from(int d) { return static_cast<msd_dtype>(d); }
};

// Wraps a C kernel `msd_status fn(Args...)` into a Python-callable that raises on failure.
template <class... Args>
auto checked(msd_status (*fn)(Args...)) {
    return [fn](typename PyArg<Args>::type... args) {
        raise_if_failed(fn(PyArg<Args>::from(args)...));
    };
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "msd_engine kernels (csrc/include/msd_engine.h), bound for msd_engine.native";
    m.attr("FLOAT32") = static_cast<int>(MSD_FLOAT32);
    m.attr("FLOAT16") = static_cast<int>(MSD_FLOAT16);
    m.attr("BFLOAT16") = static_cast<int>(MSD_BFLOAT16);
    m.attr("CPU_ISA_SCALAR") = static_cast<int>(MSD_CPU_ISA_SCALAR);
    m.attr("CPU_ISA_AVX2") = static_cast<int>(MSD_CPU_ISA_AVX2);
    m.attr("CPU_ISA_AVX512") = static_cast<int>(MSD_CPU_ISA_AVX512);
    m.attr("CPU_ISA_AVX512_BF16") = static_cast<int>(MSD_CPU_ISA_AVX512_BF16);
    m.attr("CPU_ISA_AMX") = static_cast<int>(MSD_CPU_ISA_AMX);
    const auto nogil = py::call_guard<py::gil_scoped_release>();

    m.def("cuda_compiled", [] { return msd_cuda_compiled() != 0; });
    m.def("cuda_device_count", &msd_cuda_device_count);
    m.def("rms_norm_cpu", checked(&msd_rms_norm_cpu), nogil);
    m.def("rms_norm_cuda", checked(&msd_rms_norm_cuda), nogil);
    m.def("add_rms_norm_cpu", checked(&msd_add_rms_norm_cpu), nogil);
    m.def("add_rms_norm_cuda", checked(&msd_add_rms_norm_cuda), nogil);
    m.def("silu_mul_cpu", checked(&msd_silu_mul_cpu), nogil);
    m.def("silu_mul_cuda", checked(&msd_silu_mul_cuda), nogil);
    m.def("linear_cpu", checked(&msd_linear_cpu), nogil);
    m.def("logsoftmax_topk_cpu", checked(&msd_logsoftmax_topk_cpu), nogil);
    m.def("tree_attention_cpu", checked(&msd_tree_attention_cpu), nogil);
    m.def("tree_attention_cuda", checked(&msd_tree_attention_cuda), nogil);
    m.def("tree_attention_cuda_workspace_bytes",
          [](int64_t num_queries, int64_t num_heads, int64_t head_dim, int64_t prefix_len,
             int64_t region) {
              int64_t bytes = 0;
              raise_if_failed(msd_tree_attention_cuda_workspace_bytes(
                  num_queries, num_heads, head_dim, prefix_len, region, &bytes));
              return bytes;
          });
    m.def("kv_compact_cpu", checked(&msd_kv_compact_cpu), nogil);
    m.def("kv_compact_cuda", checked(&msd_kv_compact_cuda), nogil);
    m.def("draft_inputs_cpu", checked(&msd_draft_inputs_cpu), nogil);
    m.def("draft_inputs_cuda", checked(&msd_draft_inputs_cuda), nogil);
    m.def("rope_kv_write_cpu", checked(&msd_rope_kv_write_cpu), nogil);
    m.def("rope_kv_write_cuda", checked(&msd_rope_kv_write_cuda), nogil);
    py::class_<msd_decoder_layer>(m, "DecoderLayer")
        .def(py::init([](uintptr_t qkv_weight, uintptr_t o_weight, uintptr_t post_attention_norm,
                         uintptr_t gate_up_weight, uintptr_t down_weight, uintptr_t next_norm,
                         int64_t hidden, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t intermediate, float rms_norm_eps,
                         float sm_scale) {
            const auto ptr = [](uintptr_t p) { return reinterpret_cast<const void*>(p); };
            return msd_decoder_layer{ptr(qkv_weight), ptr(o_weight), ptr(post_attention_norm),
                                     ptr(gate_up_weight), ptr(down_weight), ptr(next_norm),
                                     hidden, num_heads, num_kv_heads, head_dim, intermediate,
                                     rms_norm_eps, sm_scale};
        }));
    m.def("decoder_layer_cpu", checked(&msd_decoder_layer_cpu), nogil);
    // The head keeps a reference to its layer (py::keep_alive), whose address it holds.
    py::class_<msd_draft_head>(m, "DraftHead")
        .def(py::init([](const msd_decoder_layer& layer, uintptr_t embed, int64_t vocab_size, uintptr_t fc_weight,
                         uintptr_t fc_bias, uintptr_t lm_head, uintptr_t vocab_ids, int64_t draft_vocab,
                         uintptr_t cos, uintptr_t sin, int64_t max_positions, uintptr_t k_cache, uintptr_t v_cache,
                         int64_t num_slots, int64_t cache_head_stride, int64_t cache_slot_stride, int dtype) {
                 const auto ptr = [](uintptr_t p) { return reinterpret_cast<const void*>(p); };
                 return msd_draft_head{&layer, ptr(embed), vocab_size, ptr(fc_weight), ptr(fc_bias), ptr(lm_head),
                                       reinterpret_cast<const int64_t*>(vocab_ids), draft_vocab, ptr(cos), ptr(sin),
                                       max_positions, reinterpret_cast<void*>(k_cache),
                                       reinterpret_cast<void*>(v_cache), num_slots, cache_head_stride,
                                       cache_slot_stride, static_cast<msd_dtype>(dtype)};
             }),
             py::keep_alive<1, 2>());
    m.def("draft_tree_cpu", checked(&msd_draft_tree_cpu), nogil);
    m.def("draft_extend_cpu", checked(&msd_draft_extend_cpu), nogil);
    m.def("cpu_isa", [] { return static_cast<int>(msd_get_cpu_isa()); });
    m.def("set_cpu_isa", checked(&msd_set_cpu_isa));
    m.def("set_cpu_spin_us", checked(&msd_set_cpu_spin_us));
}
