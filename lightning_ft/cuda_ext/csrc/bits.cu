// ComPEFT's bit packing: booleans (one byte each) to uint8 with 8 bits per byte in little bit order, and back.
// ComPEFT stores a ternary tensor as two such bitmaps (kept positions, signs of the kept entries) and one scale.
// Reference: lightning_ft.merging.compeft.pack_bits / unpack_bits (numpy's packbits with bitorder="little").
#include "common.cuh"

__global__ void lft_pack_bits_kernel(const uint8_t* __restrict__ bits, int64_t count, uint8_t* __restrict__ packed,
                                     int64_t nbytes) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nbytes; b += (int64_t)gridDim.x * blockDim.x) {
    const int64_t first = b * 8;
    unsigned int byte = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (first + k < count && bits[first + k] != 0) byte |= 1u << k;
    }
    packed[b] = static_cast<uint8_t>(byte);
  }
}

__global__ void lft_unpack_bits_kernel(const uint8_t* __restrict__ packed, int64_t count, uint8_t* __restrict__ bits) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    bits[i] = (packed[i >> 3] >> (i & 7)) & 1u;
  }
}

// ``bits``: ``count`` bytes (0 or not); ``packed``: ceil(count / 8) bytes. Returns a cudaError_t code.
extern "C" int lft_pack_bits(const uint8_t* bits, int64_t count, uint8_t* packed, uintptr_t stream) {
  if (count <= 0) return 0;
  const int64_t nbytes = (count + 7) / 8;
  const int threads = 256;
  lft_pack_bits_kernel<<<lft_blocks(nbytes, threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      bits, count, packed, nbytes);
  return static_cast<int>(cudaGetLastError());
}

// ``packed``: ceil(count / 8) bytes; ``bits``: ``count`` bytes of 0 or 1. Returns a cudaError_t code.
extern "C" int lft_unpack_bits(const uint8_t* packed, int64_t count, uint8_t* bits, uintptr_t stream) {
  if (count <= 0) return 0;
  const int threads = 256;
  lft_unpack_bits_kernel<<<lft_blocks(count, threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      packed, count, bits);
  return static_cast<int>(cudaGetLastError());
}
