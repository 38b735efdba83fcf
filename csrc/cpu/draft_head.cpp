// The draft head's two per-round steps in one call each (semantics in msd_engine.h).
//
// msd_draft_extend_cpu commits accepted tokens: draft_inputs and the layer over the m rows under a
// causal mask, as TreeDrafter.extend computes them for text tokens.
//
// msd_draft_tree_cpu: a whole EAGLE-2 drafting step, the loop TreeDrafter.draft runs in Python, on
// the same kernels: per level draft_inputs (embedding + fc), decoder_layer (the draft's one layer,
// no norm after it), linear (lm_head) and logsoftmax_topk, then the frontier and the final
// selection on host arrays. The kernels are those of the per-call path with the same operands, so
// the tree is the Python loop's; what goes is ~0.4 ms of Python per step (SmolLM2 draft, 2-core
// Xeon), and the commit's ~0.2 ms.
//
// Scratch slots: level l (1-based) writes its k frontier nodes at slots committed + (l - 1) k ..,
// and each node sees the committed prefix, its ancestors' slots and its own.
#include <algorithm>
#include <cstring>
#include <new>
#include <numeric>
#include <vector>

#include "cpu/buffer.h"
#include "cpu/logsoftmax_topk.h"
#include "internal.h"

namespace msd::cpu {
namespace {

// Candidate ids from best score to worst, ties in id order, NaN first (torch.sort's descending
// stable order, as the Python loop ranks).
std::vector<int64_t> ranked(const float* scores, int64_t n) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [scores](int64_t a, int64_t b) { return TopK::above(scores[a], scores[b]); });
    return order;
}

// The k best next tokens of `rows` hidden rows: log-probs [rows, k] and target ids [rows, k].
msd_status top_k(const msd_draft_head& head, const void* hidden, int64_t rows, int64_t k, int num_threads,
                 std::vector<unsigned char>& logits, float* values, int64_t* ids) {
    const int64_t h = head.layer->hidden;
    const msd_dtype dtype = head.dtype;
    if (!reserve(logits, rows * head.draft_vocab * dtype_bytes(dtype), "the draft logits")) {
        return MSD_ERR_OUT_OF_MEMORY;
    }
    msd_status status = linear(hidden, head.lm_head, nullptr, logits.data(), rows, head.draft_vocab, h, h, h,
                               head.draft_vocab, dtype, num_threads);
    if (status != MSD_OK) return status;
    status = logsoftmax_topk(logits.data(), values, ids, rows, head.draft_vocab, k, head.draft_vocab, dtype);
    if (status != MSD_OK || head.vocab_ids == nullptr) return status;
    for (int64_t i = 0; i < rows * k; ++i) {
        const int64_t row = ids[i];
        ids[i] = head.vocab_ids[row];
        if (ids[i] < 0 || ids[i] >= head.vocab_size) {  // the next level gathers embed[ids]
            return set_error(MSD_ERR_INVALID_ARGUMENT, "head->vocab_ids[%lld] = %lld is outside [0, vocab_size = %lld)",
                             static_cast<long long>(row), static_cast<long long>(ids[i]),
                             static_cast<long long>(head.vocab_size));
        }
    }
    return MSD_OK;
}

}  // namespace

msd_status draft_extend(const msd_draft_head& head, const int64_t* token_ids, const void* features,
                        int64_t m, int64_t features_row_stride, int64_t committed, void* hidden,
                        int64_t hidden_row_stride, int num_threads) {
    const msd_decoder_layer& layer = *head.layer;
    const msd_dtype dtype = head.dtype;
    const int64_t h = layer.hidden;
    const int64_t bytes = dtype_bytes(dtype);
    thread_local std::vector<unsigned char> x;
    thread_local std::vector<int32_t> mask_bits;
    if (!reserve(x, m * h * bytes, "the draft layer input") || !reserve(mask_bits, m, "the draft mask")) {
        return MSD_ERR_OUT_OF_MEMORY;
    }
    const DraftInputs in{token_ids, nullptr, head.embed, nullptr, features, head.fc_weight, head.fc_bias, x.data(),
                         m, h, head.vocab_size, h, h, features_row_stride, 2 * h, h, false, dtype};
    msd_status status = draft_inputs(in, num_threads);
    if (status != MSD_OK) return status;
    auto* out = static_cast<unsigned char*>(hidden);
    for (int64_t t = 0; t < m; ++t) {  // residual = input
        std::memcpy(out + t * hidden_row_stride * bytes, x.data() + t * h * bytes, static_cast<size_t>(h * bytes));
        mask_bits[t] = static_cast<int32_t>((2u << t) - 1u);  // causal: region slots 0..t (m <= 16)
    }
    const int64_t table_bytes = committed * layer.head_dim * bytes;
    const DecoderStep step{x.data(), hidden, m, h, hidden_row_stride,
                           static_cast<const unsigned char*>(head.cos) + table_bytes,
                           static_cast<const unsigned char*>(head.sin) + table_bytes, layer.head_dim, head.k_cache,
                           head.v_cache, head.cache_head_stride, head.cache_slot_stride, committed, committed,
                           m > 1 ? mask_bits.data() : nullptr};
    return decoder_layer(layer, step, dtype, num_threads);
}

namespace {

msd_status tree_steps(const msd_draft_head& head, const void* last_hidden, int64_t committed, int64_t root_token,
                      int64_t k, int64_t depth, int64_t total_tokens, int64_t* tokens, int64_t* parents,
                      int64_t* num_nodes, int num_threads) {
    const msd_decoder_layer& layer = *head.layer;
    const msd_dtype dtype = head.dtype;
    const int64_t h = layer.hidden;
    const int64_t row_bytes = h * dtype_bytes(dtype);
    thread_local std::vector<unsigned char> logits, x, hidden, parent_hidden;
    thread_local std::vector<float> cand_scores, child_scores;
    thread_local std::vector<int64_t> cand_tokens, cand_parents, child_ids;
    thread_local std::vector<int32_t> mask_bits;
    const int64_t max_candidates = k + depth * k * k;
    if (!reserve(cand_scores, max_candidates, "the draft candidates") ||
        !reserve(cand_tokens, max_candidates, "the draft candidates") ||
        !reserve(cand_parents, max_candidates, "the draft candidates") ||
        !reserve(child_scores, k * k, "the draft children") || !reserve(child_ids, k * k, "the draft children") ||
        !reserve(x, k * row_bytes, "the draft layer input") || !reserve(hidden, k * row_bytes, "the draft layer") ||
        !reserve(parent_hidden, k * row_bytes, "the draft features")) {
        return MSD_ERR_OUT_OF_MEMORY;
    }

    // Level 0: the root's k best children.
    msd_status status = top_k(head, last_hidden, 1, k, num_threads, logits, cand_scores.data(), cand_tokens.data());
    if (status != MSD_OK) return status;
    int64_t count = k;
    std::vector<int64_t> frontier(static_cast<size_t>(k));  // candidate ids of the frontier nodes
    std::vector<int64_t> frontier_tokens(static_cast<size_t>(k));
    std::vector<float> frontier_scores(static_cast<size_t>(k));
    std::vector<std::vector<int64_t>> ancestors(static_cast<size_t>(k));  // scratch slots (level offsets)
    for (int64_t i = 0; i < k; ++i) {
        cand_parents[i] = -1;
        frontier[i] = i;
        frontier_tokens[i] = cand_tokens[i];
        frontier_scores[i] = cand_scores[i];
    }
    // The frontier's features: level 1's nodes all hang off the root (last_hidden, row stride 0),
    // later levels' off their parents' output rows, gathered into parent_hidden.
    const void* features = last_hidden;
    int64_t features_stride = 0;

    for (int64_t level = 1; level <= depth; ++level) {
        const int64_t start = committed + (level - 1) * k;
        const int64_t words = (level * k + 31) / 32;  // the mask's region: this and the earlier levels
        const DraftInputs in{frontier_tokens.data(), nullptr, head.embed, nullptr, features, head.fc_weight,
                             head.fc_bias, x.data(), k, h, head.vocab_size, h, h, features_stride, 2 * h, h,
                             false, dtype};
        status = draft_inputs(in, num_threads);
        if (status != MSD_OK) return status;
        std::memcpy(hidden.data(), x.data(), static_cast<size_t>(k * row_bytes));  // residual = input
        if (!reserve(mask_bits, k * words, "the draft mask")) return MSD_ERR_OUT_OF_MEMORY;
        std::fill(mask_bits.begin(), mask_bits.begin() + k * words, 0);
        for (int64_t i = 0; i < k; ++i) {
            for (int64_t slot : ancestors[i]) mask_bits[i * words + slot / 32] |= int32_t(1u << (slot % 32));
            const int64_t own = (level - 1) * k + i;
            mask_bits[i * words + own / 32] |= int32_t(1u << (own % 32));
        }
        // Every node of the level sits at position committed + level - 1: one table row for all.
        const int64_t position = committed + level - 1;
        const int64_t table_bytes = position * layer.head_dim * dtype_bytes(dtype);
        const DecoderStep step{x.data(), hidden.data(), k, h, h,
                               static_cast<const unsigned char*>(head.cos) + table_bytes,
                               static_cast<const unsigned char*>(head.sin) + table_bytes, 0, head.k_cache,
                               head.v_cache, head.cache_head_stride, head.cache_slot_stride, start, committed,
                               mask_bits.data()};
        status = decoder_layer(layer, step, dtype, num_threads);
        if (status != MSD_OK) return status;
        status = top_k(head, hidden.data(), k, k, num_threads, logits, child_scores.data(), child_ids.data());
        if (status != MSD_OK) return status;

        // Children: score = frontier score + log-prob (float32, as the Python loop adds them).
        const int64_t first = count;
        for (int64_t j = 0; j < k * k; ++j) {
            child_scores[j] = frontier_scores[j / k] + child_scores[j];
            cand_tokens[first + j] = child_ids[j];
            cand_scores[first + j] = child_scores[j];
            cand_parents[first + j] = frontier[j / k];
        }
        count += k * k;
        const std::vector<int64_t> next = ranked(child_scores.data(), k * k);
        std::vector<std::vector<int64_t>> next_ancestors(static_cast<size_t>(k));
        for (int64_t i = 0; i < k; ++i) {
            const int64_t child = next[i], slot = child / k;
            next_ancestors[i] = ancestors[slot];
            next_ancestors[i].push_back((level - 1) * k + slot);
            frontier[i] = first + child;
            frontier_tokens[i] = child_ids[child];
            frontier_scores[i] = child_scores[child];
            std::memcpy(parent_hidden.data() + i * row_bytes, hidden.data() + slot * row_bytes,
                        static_cast<size_t>(row_bytes));
        }
        features = parent_hidden.data();
        features_stride = h;
        ancestors.swap(next_ancestors);
    }

    // The root + the best total_tokens - 1 candidates, in creation order.
    const int64_t keep_count = std::min(total_tokens - 1, count);
    std::vector<int64_t> keep = ranked(cand_scores.data(), count);
    keep.resize(static_cast<size_t>(keep_count));
    std::sort(keep.begin(), keep.end());
    std::vector<int64_t> node_of(static_cast<size_t>(count), -1);
    tokens[0] = root_token;
    parents[0] = -1;
    for (int64_t i = 0; i < keep_count; ++i) {
        const int64_t c = keep[i], parent = cand_parents[c];
        node_of[c] = i + 1;
        const int64_t parent_node = parent < 0 ? 0 : node_of[parent];
        if (parent_node < 0) {  // a child outranked its parent: NaN scores from a broken draft
            return set_error(MSD_ERR_INVALID_ARGUMENT,
                             "draft candidate %lld was kept without its parent %lld (NaN draft scores?)",
                             static_cast<long long>(c), static_cast<long long>(parent));
        }
        tokens[i + 1] = cand_tokens[c];
        parents[i + 1] = parent_node;
    }
    *num_nodes = keep_count + 1;
    return MSD_OK;
}

}  // namespace

msd_status draft_tree(const msd_draft_head& head, const void* last_hidden, int64_t committed,
                      int64_t root_token, int64_t k, int64_t depth, int64_t total_tokens, int64_t* tokens,
                      int64_t* parents, int64_t* num_nodes, int num_threads) {
    try {  // the frontier's small host vectors: an allocation failure must not escape the C API
        return tree_steps(head, last_hidden, committed, root_token, k, depth, total_tokens, tokens, parents,
                          num_nodes, num_threads);
    } catch (const std::bad_alloc&) {
        return set_error(MSD_ERR_OUT_OF_MEMORY, "cannot allocate the draft tree's candidate lists");
    }
}

}  // namespace msd::cpu
