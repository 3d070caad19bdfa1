// The watermark's CUDA kernels, compiled by NVRTC when first used (see cuda.rs), with
// --fmad=false --ftz=false: every float operation rounds as the CPU path's does, so results are
// bit-identical to it. Each function mirrors the Rust it names.
//
// Element kinds: 0 = bf16, 1 = f16, 2 = f32 (little-endian bit patterns, as in the files).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ---- ChaCha8 (IETF: 32-bit block counter in word 12, zero nonce), as stream.rs ----

#define ROTL(x, n) __funnelshift_l((x), (x), (n))
#define QUARTER(a, b, c, d)                                                                      \
    a += b; d ^= a; d = ROTL(d, 16);                                                             \
    c += d; b ^= c; b = ROTL(b, 12);                                                             \
    a += b; d ^= a; d = ROTL(d, 8);                                                              \
    c += d; b ^= c; b = ROTL(b, 7);

// Block `counter` of the keystream under `key` (8 little-endian words): 512 bits, bit i of the
// stream (element 512 * counter + i) is bit i % 32 of out[i / 32]; byte i is element
// 64 * counter + i of a byte stream.
__device__ __forceinline__ void chacha8(const u32 key[8], u32 counter, u32 out[16]) {
    u32 x[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u, key[0], key[1], key[2],
                 key[3],      key[4],      key[5],      key[6],      key[7], counter, 0u, 0u, 0u};
#pragma unroll
    for (int round = 0; round < 4; round++) {
        QUARTER(x[0], x[4], x[8], x[12]);
        QUARTER(x[1], x[5], x[9], x[13]);
        QUARTER(x[2], x[6], x[10], x[14]);
        QUARTER(x[3], x[7], x[11], x[15]);
        QUARTER(x[0], x[5], x[10], x[15]);
        QUARTER(x[1], x[6], x[11], x[12]);
        QUARTER(x[2], x[7], x[8], x[13]);
        QUARTER(x[3], x[4], x[9], x[14]);
    }
    out[0] = x[0] + 0x61707865u;
    out[1] = x[1] + 0x3320646eu;
    out[2] = x[2] + 0x79622d32u;
    out[3] = x[3] + 0x6b206574u;
#pragma unroll
    for (int i = 0; i < 8; i++) out[4 + i] = x[4 + i] + key[i];
    out[12] = x[12] + counter;
    out[13] = x[13];
    out[14] = x[14];
    out[15] = x[15];
}

__device__ __forceinline__ void load_key(const u32* src, u32 key[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) key[i] = src[i];
}

// Blocks first_block.. of one stream, for the determinism check.
extern "C" __global__ void keystream(const u32* key_words, u32 first_block, u32 blocks, u32* out) {
    u32 b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    u32 key[8], words[16];
    load_key(key_words, key);
    chacha8(key, first_block + b, words);
#pragma unroll
    for (int i = 0; i < 16; i++) out[16 * b + i] = words[i];
}

// ---- floats ----

__device__ __forceinline__ float half_to_float(u32 bits) {
    float f;
    u16 h = (u16)bits;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u32 load_bits(const void* data, int kind, u64 i) {
    if (kind == 2) return ((const u32*)data)[i];
    return ((const u16*)data)[i];
}

__device__ __forceinline__ float load_value(const void* data, int kind, u64 i) {
    u32 bits = load_bits(data, kind, i);
    if (kind == 0) return __uint_as_float(bits << 16);
    if (kind == 1) return half_to_float(bits);
    return __uint_as_float(bits);
}

// mark.rs: step_bf16, step_f16, step_f32 (and bf16_ulp). For values that are not markable the
// moved pattern may differ from the CPU's; it is never used (neither marked nor, in the
// acceptance table, the target of a markable code).

// Whether a bf16 step grows the magnitude: up in value for positives, down for negatives, and
// never to infinity from the largest finite value nor to a subnormal from the smallest normal.
__device__ __forceinline__ u32 bf16_grow(u32 bits, bool up) {
    u32 magnitude = bits & 0x7FFFu;
    u32 grow = (up ? 1u : 0u) ^ (bits >> 15);
    return magnitude == 0x7F7Fu ? 0u : (magnitude == 0x0080u ? 1u : grow);
}

__device__ __forceinline__ bool bf16_markable(u32 bits) {
    return (bits & 0x7FFFu) - 0x80u < 0x7F00u;  // exponent field neither 0 nor 0xFF
}

__device__ __forceinline__ u32 step_bf16(u32 bits, bool up, bool* markable) {
    *markable = bf16_markable(bits);
    // a markable magnitude stays inside the normal range: the sign bit is untouched
    return bits + 2 * bf16_grow(bits, up) - 1;
}

__device__ __forceinline__ float bf16_ulp(float value) {
    u32 exponent = (__float_as_uint(value) >> 23) & 0xFF;
    u32 e = exponent > 7 ? exponent - 7 : 0;
    return __uint_as_float((e > 1 ? e : 1) << 23);
}

__device__ __forceinline__ u32 step_f16(u32 bits, bool up, bool* markable) {
    u32 exponent = (bits >> 10) & 0x1F;
    if (exponent == 0 || exponent == 0x1F) {
        *markable = false;
        return bits;
    }
    *markable = true;
    float value = half_to_float(bits);
    float ulp = bf16_ulp(value);
    u32 moved = float_to_half(up ? __fadd_rn(value, ulp) : __fsub_rn(value, ulp));
    if ((moved & 0x7FFFu) == 0x7C00u) moved = float_to_half(up ? __fsub_rn(value, ulp) : __fadd_rn(value, ulp));
    return moved;
}

__device__ __forceinline__ u32 step_f32(u32 bits, bool up, bool* markable) {
    u32 exponent = (bits >> 23) & 0xFF;
    *markable = exponent >= 8 && exponent <= 253;
    float value = __uint_as_float(bits);
    float ulp = __uint_as_float((exponent - 7u) << 23);
    return __float_as_uint(up ? __fadd_rn(value, ulp) : __fsub_rn(value, ulp));
}

// ---- embedding (mark.rs, balance.rs) ----

// The code of an element for the acceptance table: its bit pattern at bf16-equivalent precision.
__device__ __forceinline__ u32 code_shift(int kind) { return kind == 0 ? 0 : (kind == 1 ? 3 : 16); }

// Eight consecutive elements from element i: one 16-byte load for 16-bit kinds, two for f32
// (`data` + i must be 16-byte aligned). Memory-bound kernels need the bytes in flight.
template <int KIND>
__device__ __forceinline__ void load8(const void* data, u64 i, u32 v[8]) {
    if (KIND == 2) {
        const uint4* p = (const uint4*)((const u32*)data + i);
        uint4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        uint4 a = *(const uint4*)((const u16*)data + i);
        v[0] = a.x & 0xFFFF; v[1] = a.x >> 16; v[2] = a.y & 0xFFFF; v[3] = a.y >> 16;
        v[4] = a.z & 0xFFFF; v[5] = a.z >> 16; v[6] = a.w & 0xFFFF; v[7] = a.w >> 16;
    }
}

template <int KIND>
__device__ __forceinline__ void store8(void* data, u64 i, const u32 v[8]) {
    if (KIND == 2) {
        uint4* p = (uint4*)((u32*)data + i);
        p[0] = make_uint4(v[0], v[1], v[2], v[3]);
        p[1] = make_uint4(v[4], v[5], v[6], v[7]);
    } else {
        *(uint4*)((u16*)data + i) =
            make_uint4(v[0] | v[1] << 16, v[2] | v[3] << 16, v[4] | v[5] << 16, v[6] | v[7] << 16);
    }
}

// Elements i..i+8 of n: whole and aligned, one vector load; else one by one, zeros past n
// (zero is never marked).
template <int KIND>
__device__ __forceinline__ bool load_group(const void* data, u64 i, u64 n, bool aligned, u32 v[8]) {
    if (aligned && i + 8 <= n) {
        load8<KIND>(data, i, v);
        return true;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = i + j < n ? load_bits(data, KIND, i + j) : 0;
    return false;
}

// Codes with these exponent fields (both signs) are counted in shared memory; the rest, which
// real weights rarely have, with global atomics. f16 codes all fit.
#define WINDOW_LOW 96u
#define WINDOW_CODES 8192u

template <int KIND>
__device__ __forceinline__ void histogram_span(const void* data, u64 n, bool aligned, u32* window, u32* counts) {
    u64 groups = (n + 7) / 8;
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (u64)gridDim.x * blockDim.x) {
        u32 v[8];
        bool whole = load_group<KIND>(data, 8 * g, n, aligned, v);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (!whole && 8 * g + j >= n) break;
            u32 code = v[j] >> code_shift(KIND);
            u32 slot;
            if (KIND == 1) {
                slot = code;
            } else {
                // sign, then exponents WINDOW_LOW..WINDOW_LOW + 31, then the 7 mantissa bits
                u32 offset = ((code >> 7) & 0xFF) - WINDOW_LOW;
                slot = offset < 32 ? ((code >> 15) << 12) | (offset << 7) | (code & 0x7F) : WINDOW_CODES;
            }
            if (slot < WINDOW_CODES) atomicAdd(&window[slot], 1u);
            else atomicAdd(&counts[code], 1u);
        }
    }
}

extern "C" __global__ void histogram(const void* data, int kind, u64 n, int aligned, u32* counts) {
    __shared__ u32 window[WINDOW_CODES];
    for (u32 i = threadIdx.x; i < WINDOW_CODES; i += blockDim.x) window[i] = 0;
    __syncthreads();
    if (kind == 0) histogram_span<0>(data, n, aligned, window, counts);
    else if (kind == 1) histogram_span<1>(data, n, aligned, window, counts);
    else histogram_span<2>(data, n, aligned, window, counts);
    __syncthreads();
    for (u32 slot = threadIdx.x; slot < WINDOW_CODES; slot += blockDim.x) {
        u32 count = window[slot];
        if (count == 0) continue;
        u32 code = kind == 1 ? slot : ((slot >> 12) << 15) | ((((slot >> 7) & 31) + WINDOW_LOW) << 7) | (slot & 0x7F);
        atomicAdd(&counts[code], count);
    }
}

// balance.rs's Acceptance::from_histogram: for each code and direction, min(256, round(256 *
// count(target) / count(source))) with `pseudo` added to every count; at 2 * code + up.
extern "C" __global__ void acceptance(const u32* histogram, int kind, u32 codes, u32 pseudo, u32* table) {
    u32 slot = blockIdx.x * blockDim.x + threadIdx.x;
    if (slot >= 2 * codes) return;
    u32 code = slot >> 1, shift = code_shift(kind);
    bool up = slot & 1, markable;
    u32 bits = code << shift;
    u32 moved = kind == 0 ? step_bf16(bits, up, &markable)
              : (kind == 1 ? step_f16(bits, up, &markable) : step_f32(bits, up, &markable));
    u32 target = (moved >> shift) & (codes - 1);
    u64 source = (u64)histogram[code] + pseudo;
    u64 ratio = (256 * ((u64)histogram[target] + pseudo) + source / 2) / source;
    table[slot] = (u32)(ratio < 256 ? ratio : 256);
}

// For bf16, whose code is the whole bit pattern, everything a step needs in one word per code:
// the acceptance down (bits 0-8) and up (9-17), markable (18), and the grow bit of a step down
// (19) and up (20). One gather per weight then replaces the step's arithmetic.
extern "C" __global__ void pack_bf16(const u32* table, u32* packed) {
    u32 code = blockIdx.x * blockDim.x + threadIdx.x;
    if (code >= 65536) return;
    packed[code] = table[2 * code] | table[2 * code + 1] << 9 | (u32)bf16_markable(code) << 18
                 | bf16_grow(code, false) << 19 | bf16_grow(code, true) << 20;
}

#define MARK_THREADS 256
#define MARK_SPAN (MARK_THREADS * 64)  // elements per block: one coin block per thread
#define MARK_BIT_BLOCKS (MARK_SPAN / 512)
// Consecutive weights per thread and step: one load_group (16 bytes of bf16). The step loop's
// bit masks and its two coin words are written for eight.
#define MARK_GROUP 8

template <int KIND>
__device__ __forceinline__ u32 step(u32 bits, bool up, bool* markable) {
    if (KIND == 0) return step_bf16(bits, up, markable);
    if (KIND == 1) return step_f16(bits, up, markable);
    return step_f32(bits, up, markable);
}

// Phase two of `mark`: eight consecutive elements per thread and step.
template <int KIND>
__device__ __forceinline__ void mark_span(const void* src, void* dst, u64 base, u64 n, bool aligned, bool with_license,
                                          const u32* table, const u32* coins, const u32* partition,
                                          const u32* owner, const u32* license, u32* changed_a, u32* changed_b) {
    for (u32 group = threadIdx.x; group < MARK_SPAN / MARK_GROUP; group += MARK_THREADS) {
        u32 e = MARK_GROUP * group;
        u64 i = base + e;
        if (i >= n) break;
        u32 shift = e & 31;
        u32 parts = partition[e >> 5] >> shift;
        u32 licenses = with_license ? license[e >> 5] >> shift : 0;
        // per weight: up in value (half A: the owner bit, half B: the license bit), and whether
        // it is marked at all (half A only, without a license)
        u32 ups = (parts & (owner[e >> 5] >> shift)) | (~parts & licenses);
        u32 selected = with_license ? 0xFFu : parts;
        u32 coin_words[2] = {coins[e >> 2], coins[(e >> 2) + 1]};
        u32 v[MARK_GROUP];
        bool whole = load_group<KIND>(src, i, n, aligned, v);
        u32 taken = 0;
#pragma unroll
        for (int j = 0; j < MARK_GROUP; j++) {
            u32 up = (ups >> j) & 1;
            u32 coin = __byte_perm(coin_words[j >> 2], 0, 0x4440 | (j & 3));
            if (KIND == 0) {
                // `table` is pack_bf16's
                u32 entry = table[v[j]];
                u32 acceptance = (entry >> (9 * up)) & 0x1FF;
                u32 take = (entry >> 18) & (u32)(coin < acceptance) & (selected >> j) & 1;
                taken |= take << j;
                v[j] = take ? v[j] + 2 * ((entry >> (19 + up)) & 1) - 1 : v[j];
            } else {
                bool markable;
                u32 moved = step<KIND>(v[j], up, &markable);
                // codes of every kind are below the table's length: no mask needed
                u32 acceptance = table[(v[j] >> code_shift(KIND)) << 1 | up];
                u32 take = (u32)markable & (u32)(coin < acceptance) & (selected >> j);
                taken |= (take & 1) << j;
                v[j] = take & 1 ? moved : v[j];
            }
        }
        *changed_a += __popc(taken & parts);
        *changed_b += __popc(taken & ~parts);
        if (whole) {
            store8<KIND>(dst, i, v);
        } else {
#pragma unroll
            for (int j = 0; j < MARK_GROUP; j++) {
                if (i + j >= n) break;
                if (KIND == 2) ((u32*)dst)[i + j] = v[j];
                else ((u16*)dst)[i + j] = (u16)v[j];
            }
        }
    }
}

// The four keys of a mark, passed by value (no upload before each launch).
struct MarkKeys {
    u32 words[32];
};

// Marks elements [0, n) of `src` into `dst` as mark.rs's mark_chunk does. keys: partition,
// owner, license, coin (8 words each); table: for bf16 pack_bf16's word per code, else the
// acceptance at 2 * code + up; counts: changed weights of half A and half B. `aligned`: both tensors start on 16 bytes.
extern "C" __global__ void __launch_bounds__(MARK_THREADS)
    mark(const void* src, void* dst, int kind, u64 n, int aligned, MarkKeys keys, int with_license,
         const u32* table, unsigned long long* counts) {
    __shared__ u32 coins[MARK_SPAN / 4];
    __shared__ u32 bits[3][MARK_BIT_BLOCKS * 16];
    u64 base = (u64)blockIdx.x * MARK_SPAN;
    u32 t = threadIdx.x;
    u32 key[8], words[16];
    load_key(keys.words + 24, key);
    chacha8(key, (u32)(base / 64) + t, words);
#pragma unroll
    for (int i = 0; i < 16; i++) coins[16 * t + i] = words[i];
    u32 streams = with_license ? 3 : 2;
    if (t < streams * MARK_BIT_BLOCKS) {
        u32 stream = t / MARK_BIT_BLOCKS, block = t % MARK_BIT_BLOCKS;
        load_key(keys.words + 8 * stream, key);
        chacha8(key, (u32)(base / 512) + block, words);
#pragma unroll
        for (int i = 0; i < 16; i++) bits[stream][16 * block + i] = words[i];
    }
    __syncthreads();
    u32 changed_a = 0, changed_b = 0;
    if (kind == 0)
        mark_span<0>(src, dst, base, n, aligned, with_license, table, coins, bits[0], bits[1], bits[2], &changed_a, &changed_b);
    else if (kind == 1)
        mark_span<1>(src, dst, base, n, aligned, with_license, table, coins, bits[0], bits[1], bits[2], &changed_a, &changed_b);
    else
        mark_span<2>(src, dst, base, n, aligned, with_license, table, coins, bits[0], bits[1], bits[2], &changed_a, &changed_b);
    changed_a = __reduce_add_sync(0xFFFFFFFFu, changed_a);
    changed_b = __reduce_add_sync(0xFFFFFFFFu, changed_b);
    if ((t & 31) == 0) {
        atomicAdd(&counts[0], (unsigned long long)changed_a);
        atomicAdd(&counts[1], (unsigned long long)changed_b);
    }
}

// ---- detection (detect.rs: features_body and count_matches_body) ----

#define FIELDS 17  // per 32 weights: positive, 7 correlation planes, 7 kept planes, ulp, sign
#define TOTALS 9   // n, erased, corr_abs, corr_sq, kept_n (unused here), kept_abs, kept_sq, ulp, sign

__device__ __forceinline__ void markable_exponents(int kind, u32* low, u32* high) {
    if (kind == 0) { *low = 1; *high = 254; }
    else if (kind == 2) { *low = 8; *high = 253; }
    else { *low = 113; *high = 142; }
}

// The features of one tensor's weights of one half, 32 weights per record of FIELDS words, in
// groups of 512 (one partition block: 16 records), and their key-independent totals.
extern "C" __global__ void __launch_bounds__(512)
    features(const void* original, int original_kind, const void* suspect, int suspect_kind, u64 n,
             int half_a, const u32* partition_key, u32* records, unsigned long long* totals) {
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 low, high;
    markable_exponents(original_kind, &low, &high);
    u32 key[8];
    load_key(partition_key, key);
    u64 sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // n, erased, x, x², k, k², ulp, sign
    u64 groups = (n + 511) / 512;
    for (u64 g = blockIdx.x; g < groups; g += gridDim.x) {
        u32 part_word = 0;
        if (lane == 0) {
            u32 words[16];
            chacha8(key, (u32)g, words);
#pragma unroll
            for (int i = 0; i < 16; i++)
                if (i == warp) part_word = words[i];
        }
        part_word = __shfl_sync(0xFFFFFFFFu, part_word, 0);
        u64 i = g * 512 + threadIdx.x;
        bool in = i < n;
        float w0 = in ? load_value(original, original_kind, i) : 0.0f;
        float w1 = in ? load_value(suspect, suspect_kind, i) : 0.0f;
        if (isnan(w1)) w1 = 0.0f;
        bool part = (part_word >> lane) & 1;
        u32 exponent = (__float_as_uint(w0) >> 23) & 0xFF;
        bool valid = in && (half_a ? part : !part) && (exponent - low <= high - low);
        u32 e = exponent < 261 ? 261 - exponent : 0;
        float scale = __uint_as_float((e < 1 ? 1 : (e > 254 ? 254 : e)) << 23);
        float r = __fmul_rn(__fsub_rn(w1, w0), scale);
        bool erased = valid && w1 == 0.0f;
        u32 x = valid ? (u32)fminf(floorf(__fadd_rn(__fmul_rn(fabsf(r), 4.0f), 0.5f)), 127.0f) : 0;
        u32 k = erased ? 0 : x;
        bool ulp = valid && !erased && fabsf(r) >= 0.5f;
        bool sign = valid && !erased && r != 0.0f;
        u32 record[FIELDS];
        record[0] = __ballot_sync(0xFFFFFFFFu, valid && r > 0.0f);
#pragma unroll
        for (int plane = 0; plane < 7; plane++) {
            record[1 + plane] = __ballot_sync(0xFFFFFFFFu, (x >> plane) & 1);
            record[8 + plane] = __ballot_sync(0xFFFFFFFFu, (k >> plane) & 1);
        }
        record[15] = __ballot_sync(0xFFFFFFFFu, ulp);
        record[16] = __ballot_sync(0xFFFFFFFFu, sign);
        u32 mine = 0;
#pragma unroll
        for (int f = 0; f < FIELDS; f++)
            if (lane == f) mine = record[f];
        if (lane < FIELDS) records[(g * 16 + warp) * FIELDS + lane] = mine;
        sums[0] += __reduce_add_sync(0xFFFFFFFFu, valid ? 1u : 0u);
        sums[1] += __reduce_add_sync(0xFFFFFFFFu, erased ? 1u : 0u);
        sums[2] += __reduce_add_sync(0xFFFFFFFFu, x);
        sums[3] += __reduce_add_sync(0xFFFFFFFFu, x * x);
        sums[4] += __reduce_add_sync(0xFFFFFFFFu, k);
        sums[5] += __reduce_add_sync(0xFFFFFFFFu, k * k);
        sums[6] += __reduce_add_sync(0xFFFFFFFFu, ulp ? 1u : 0u);
        sums[7] += __reduce_add_sync(0xFFFFFFFFu, sign ? 1u : 0u);
    }
    if (lane == 0) {
        atomicAdd(&totals[0], sums[0]);
        atomicAdd(&totals[1], sums[1]);
        atomicAdd(&totals[2], sums[2]);
        atomicAdd(&totals[3], sums[3]);
        atomicAdd(&totals[5], sums[4]);
        atomicAdd(&totals[6], sums[5]);
        atomicAdd(&totals[7], sums[6]);
        atomicAdd(&totals[8], sums[7]);
    }
}

#define COUNT_THREADS 256
#define TILE_BLOCKS 32                   // partition-sized blocks (512 weights) per tile
#define BLOCK_STRIDE (16 * FIELDS + 1)   // odd: the 32 lanes read 32 different banks
#define LICENSES_PER_BLOCK 32

// Per license: Σ over weights whose key bit agrees with the sign of x of |x|, for the four
// statistics, as count_matches_body. tiles: (tensor, first block in the tensor, blocks,
// first record) per tile; keys: 8 words per (license, tensor).
extern "C" __global__ void __launch_bounds__(COUNT_THREADS)
    count(const u32* records, const u32* tiles, u32 tile_count, const u32* keys, u32 tensors, u32 licenses,
          unsigned long long* counts) {
    __shared__ u32 tile[TILE_BLOCKS * BLOCK_STRIDE];
    __shared__ u64 sums[LICENSES_PER_BLOCK][4];
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 first_license = blockIdx.y * LICENSES_PER_BLOCK;
    if (threadIdx.x < LICENSES_PER_BLOCK * 4) sums[threadIdx.x / 4][threadIdx.x % 4] = 0;
    for (u32 tile_index = blockIdx.x; tile_index < tile_count; tile_index += gridDim.x) {
        u32 tensor = tiles[4 * tile_index], block0 = tiles[4 * tile_index + 1];
        u32 blocks = tiles[4 * tile_index + 2], record0 = tiles[4 * tile_index + 3];
        __syncthreads();
        const u32* src = records + (u64)record0 * FIELDS;
        for (u32 j = threadIdx.x; j < blocks * 16 * FIELDS; j += COUNT_THREADS)
            tile[(j / (16 * FIELDS)) * BLOCK_STRIDE + j % (16 * FIELDS)] = src[j];
        __syncthreads();
        const u32* mine = tile + lane * BLOCK_STRIDE;
        // warp w takes licenses w, w + 8, w + 16, w + 24 of the block's 32; lane l the tile's block l
#pragma unroll 1
        for (u32 k = 0; k < LICENSES_PER_BLOCK / 8; k++) {
            u32 local = warp + 8 * k;
            u32 license = first_license + local;
            if (license >= licenses) break;
            u32 corr = 0, kept = 0, ulp = 0, sign = 0;
            if (lane < blocks) {
                u32 key[8], bits[16];
                load_key(keys + 8 * ((u64)license * tensors + tensor), key);
                chacha8(key, block0 + lane, bits);
#pragma unroll
                for (int w = 0; w < 16; w++) {
                    const u32* record = mine + w * FIELDS;
                    u32 agree = ~(bits[w] ^ record[0]);
#pragma unroll
                    for (int plane = 0; plane < 7; plane++) {
                        corr += __popc(agree & record[1 + plane]) << plane;
                        kept += __popc(agree & record[8 + plane]) << plane;
                    }
                    ulp += __popc(agree & record[15]);
                    sign += __popc(agree & record[16]);
                }
            }
            // at most 32 × 16 × 32 × 127 per tile: the warp's sums fit in 32 bits
            corr = __reduce_add_sync(0xFFFFFFFFu, corr);
            kept = __reduce_add_sync(0xFFFFFFFFu, kept);
            ulp = __reduce_add_sync(0xFFFFFFFFu, ulp);
            sign = __reduce_add_sync(0xFFFFFFFFu, sign);
            if (lane == 0) {
                sums[local][0] += corr;
                sums[local][1] += kept;
                sums[local][2] += ulp;
                sums[local][3] += sign;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < LICENSES_PER_BLOCK * 4) {
        u32 license = first_license + threadIdx.x / 4;
        if (license < licenses) atomicAdd(&counts[4 * license + threadIdx.x % 4], sums[threadIdx.x / 4][threadIdx.x % 4]);
    }
}
