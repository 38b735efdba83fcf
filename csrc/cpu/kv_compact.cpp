// msd_kv_compact_cpu: the accepted slots of every (kv, layer, head) plane moved down in place,
// one memcpy per slot. In increasing j, slot start + j is written only after every source
// start + nodes[j'] with j' <= j was read, and later sources are nodes[j'] >= j' > j: nothing is
// clobbered before it is read (api.cpp checks j <= nodes[j]). A move copies whole slots as
// bytes, so it is the same for every dtype.
#include <cstring>

#include "internal.h"

namespace msd::cpu {

msd_status kv_compact(void* arena, int64_t planes, int64_t max_slots, int64_t head_dim,
                      int64_t start, const int64_t* nodes, int64_t num_nodes, msd_dtype dtype) {
    const int64_t slot_bytes = head_dim * dtype_bytes(dtype);
    auto* bytes = static_cast<unsigned char*>(arena);
    for (int64_t plane = 0; plane < planes; ++plane) {
        unsigned char* base = bytes + (plane * max_slots + start) * slot_bytes;
        for (int64_t j = 0; j < num_nodes; ++j) {
            if (nodes[j] == j) continue;  // already in place (the root, an unbroken prefix)
            std::memcpy(base + j * slot_bytes, base + nodes[j] * slot_bytes,
                        static_cast<size_t>(slot_bytes));
        }
    }
    return MSD_OK;
}

}  // namespace msd::cpu
