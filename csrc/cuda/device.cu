// Device discovery. With the static cudart and no driver, cudaGetDeviceCount fails cleanly
// (cudaErrorInsufficientDriver / cudaErrorNoDevice); that is "0 devices", not an error.
#include "cuda/common.cuh"

namespace msd::cuda {

int device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear the error so that it does not surface at the next launch
        return 0;
    }
    return count;
}

}  // namespace msd::cuda
