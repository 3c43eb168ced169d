// SPDX-License-Identifier: EUPL-1.2
//
// Runs the decode attention's two CUDA kernel texts (models/fused_attn.rs)
// on the CPU, for the unit test `kernel_texts_run_on_the_cpu`: one OS
// thread a CUDA thread, barriers for `__syncthreads` and the warp shuffles,
// `__shared__` arrays as statics (one block at a time), `T = float`. The
// texts come in as PART_INC and MERGE_INC (files the test writes); the
// result is compared with float64 softmax attention, and the exit status
// is 0 when every output is within 1e-4 of it, 1 when one is not (2: bad
// arguments). A deadlock (a shuffle or barrier some threads never reach)
// ends it by SIGALRM after 600 s.
//
//   emu HQ HK D MERGE_GROUPS ROWS LEN SPLITS THREADS
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>
#include <memory>
#include <unistd.h>
using std::min;
struct Dim3 { int x, y, z; };
thread_local Dim3 threadIdx;
Dim3 blockIdx, gridDim;
static std::unique_ptr<std::barrier<>> warp_bar[32];
static std::unique_ptr<std::barrier<>> block_bar;
static float shfl_buf[32][32];
float __shfl_xor_sync(unsigned, float v, int k) {
    int t = threadIdx.x, w = t >> 5, l = t & 31;
    shfl_buf[w][l] = v;
    warp_bar[w]->arrive_and_wait();
    float r = shfl_buf[w][l ^ k];
    warp_bar[w]->arrive_and_wait();
    return r;
}
void __syncthreads() { block_bar->arrive_and_wait(); }
#define __shared__ static
template <class T> struct Aligned {
    using value_type = T;
    Aligned() = default;
    template <class U> Aligned(const Aligned<U>&) {}
    T* allocate(size_t n) {
        return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(256)));
    }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(256)); }
    template <class U> bool operator==(const Aligned<U>&) const { return true; }
};
struct Shape4 { int v[4]; int operator[](int i) const { return v[i]; } };

void part_kernel(const float* q, const float* kc, const float* vc, const int* offsets,
                 Shape4 kc_shape, float* op, float* ml) {
#include PART_INC
}
void merge_kernel(const float* op, const float* ml, Shape4 ml_shape, float* y) {
#include MERGE_INC
}

template <class F> void launch(Dim3 grid, int threads, F f) {
    gridDim = grid;
    for (int z = 0; z < grid.z; ++z)
        for (int yy = 0; yy < grid.y; ++yy)
            for (int x = 0; x < grid.x; ++x) {
                blockIdx = {x, yy, z};
                block_bar = std::make_unique<std::barrier<>>(threads);
                for (int w = 0; w < threads / 32; ++w) warp_bar[w] = std::make_unique<std::barrier<>>(32);
                std::vector<std::thread> ts;
                for (int t = 0; t < threads; ++t)
                    ts.emplace_back([t, &f] { threadIdx = {t, 0, 0}; f(); });
                for (auto& t : ts) t.join();
            }
}

int main(int argc, char** argv) {
    if (argc != 9) return 2;
    alarm(600);
    const int threads = atoi(argv[8]);
    const int HQ = atoi(argv[1]), HK = atoi(argv[2]), D = atoi(argv[3]), SW = atoi(argv[4]);
    const int B = atoi(argv[5]), len = atoi(argv[6]), splits = atoi(argv[7]);
    const int cap = len + 5;
    const float scale = 1.0f / std::sqrt((float)D);
    std::mt19937 rng(len * 131 + splits * 7 + B);
    std::normal_distribution<float> nd(0, 1);
    // Buffers aligned as a device allocation is (a row of the kernel
    // loads up to 32 bytes at once).
    auto buffer = [](size_t n) {
        return std::vector<float, Aligned<float>>(n);
    };
    auto q = buffer(B * HQ * D), kc = buffer((size_t)B * HK * cap * D), vc = buffer(kc.size());
    for (auto& x : q) x = 2.0f * nd(rng);  // larger scores: a peaked softmax
    for (auto& x : kc) x = nd(rng);
    for (auto& x : vc) x = nd(rng);
    int off = len - 1;
    auto op = buffer((size_t)B * HQ * splits * D), ml = buffer((size_t)B * HQ * splits * 2),
         y = buffer(B * HQ * D);
    for (auto* v : {&op, &ml, &y}) std::fill(v->begin(), v->end(), NAN);
    Shape4 ks{{B, HK, cap, D}}, ms{{B, HQ, splits, 2}};
    launch({splits, HK, B}, threads, [&] { part_kernel(q.data(), kc.data(), vc.data(), &off, ks, op.data(), ml.data()); });
    launch({HQ, B, 1}, D * SW, [&] { merge_kernel(op.data(), ml.data(), ms, y.data()); });
    double worst = 0;
    const int G = HQ / HK;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < HQ; ++h) {
            const int kh = h / G;
            std::vector<double> sc(len);
            double mx = -1e300;
            for (int i = 0; i < len; ++i) {
                double s = 0;
                for (int d = 0; d < D; ++d)
                    s += (double)q[(b * HQ + h) * D + d] * kc[(((size_t)b * HK + kh) * cap + i) * D + d];
                sc[i] = s * scale;
                mx = std::max(mx, sc[i]);
            }
            double l = 0;
            for (auto& s : sc) { s = std::exp(s - mx); l += s; }
            for (int d = 0; d < D; ++d) {
                double a = 0;
                for (int i = 0; i < len; ++i) a += sc[i] * vc[(((size_t)b * HK + kh) * cap + i) * D + d];
                a /= l;
                worst = std::max(worst, std::fabs(a - y[(b * HQ + h) * D + d]));
                if (std::isnan(y[(b * HQ + h) * D + d])) worst = INFINITY;
            }
        }
    printf("HQ=%d HK=%d D=%d B=%d len=%d splits=%d: max |diff| %.3g\n", HQ, HK, D, B, len, splits, worst);
    return worst < 1e-4 ? 0 : 1;
}
