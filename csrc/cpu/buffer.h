// Growing the per-thread scratch buffers of the CPU kernels (kept between calls, grown to the
// largest call seen) without letting an allocation failure escape as an exception.
#pragma once

#include <cstdint>
#include <new>
#include <stdexcept>

#include "internal.h"

namespace msd::cpu {

// Grows `buffer` (a std::vector) to at least `count` elements; false, with MSD_ERR_OUT_OF_MEMORY
// set naming `what`, when that cannot be had.
template <class V>
bool reserve(V& buffer, int64_t count, const char* what) {
    try {
        if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(static_cast<size_t>(count));
        return true;
    } catch (const std::bad_alloc&) {
    } catch (const std::length_error&) {
    }
    set_error(MSD_ERR_OUT_OF_MEMORY, "cannot allocate %lld elements for %s",
              static_cast<long long>(count), what);
    return false;
}

}  // namespace msd::cpu
