#!/usr/bin/env python3
"""Measure this CPU's peak multiply-accumulate rates: fp32 FMA and u8 x s8 int8, all cores.

The ceiling under every CPU benchmark in docs/benchmarks.md: how fast PyTorch's fp32 convolutions and
ONNX Runtime's int8 ones could possibly go here, and so what int8 can gain over fp32 at most. Compiles a
small C kernel with gcc (independent accumulators, so throughput and not latency is measured) in the
widest form the CPU has:

* fp32: ``VFMADD`` on 512-bit (AVX-512) or 256-bit (AVX2) vectors: 16 or 8 MACs an instruction;
* int8: ``VPDPBUSD`` (AVX512-VNNI: 64 u8 x s8 MACs an instruction, int32 sums) where present, else
  ``VPMADDUBSW`` + ``VPMADDWD`` + ``VPADDD`` (AVX2: 32 MACs for three instructions, via saturating
  int16 pair sums: what ONNX Runtime runs on CPUs without VNNI);
* the clock: a chain of dependent integer adds (one a cycle), on one core while the others idle.

    python tools/cpu_peak.py            # JSON: GMAC/s, MACs per cycle per core, int8 over fp32

Pause other work first (``kill -STOP``): the rates are the whole machine's."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perception.core.cpu import cpu_flags, isa_summary  # noqa: E402

KERNEL = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#define N 12
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#if WIDE
typedef __m512 vf; typedef __m512i vi;
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SETF _mm512_set1_ps
#define SETI8 _mm512_set1_epi8
#define SETI32 _mm512_set1_epi32
#define ADDI _mm512_add_epi32
#define FLANES 16
#define ILANES 64
static float hsumf(vf v) { return _mm512_reduce_add_ps(v); }
static int hsumi(vi v) { return _mm512_reduce_add_epi32(v); }
#else
typedef __m256 vf; typedef __m256i vi;
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SETF _mm256_set1_ps
#define SETI8 _mm256_set1_epi8
#define SETI32 _mm256_set1_epi32
#define ADDI _mm256_add_epi32
#define FLANES 8
#define ILANES 32
static float hsumf(vf v) { float o[8]; _mm256_storeu_ps(o, v); float s = 0; for (int i = 0; i < 8; i++) s += o[i]; return s; }
static int hsumi(vi v) { int o[8]; _mm256_storeu_si256((vi *)o, v); int s = 0; for (int i = 0; i < 8; i++) s += o[i]; return s; }
#endif
static inline vi dot_u8s8(vi acc, vi a, vi b, vi ones) {
#if VNNI
  (void)ones;
  return _mm512_dpbusd_epi32(acc, a, b);
#else
  return ADDI(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
#endif
}
__attribute__((noinline)) float fma_loop(long iters) {
  vf a[N]; vf b = SETF(1.0000001f), c = SETF(1e-7f);
  for (int i = 0; i < N; i++) a[i] = SETF((float)i);
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < N; i++) a[i] = FMA(a[i], b, c);
  }
  vf s = a[0]; for (int i = 1; i < N; i++) s = s + a[i];
  return hsumf(s);
}
__attribute__((noinline)) int int8_loop(long iters) {
  vi a[N]; vi x = SETI8(3), w = SETI8(-2), ones;
#if !VNNI
  ones = _mm256_set1_epi16(1);
#else
  ones = SETI32(0);
#endif
  for (int i = 0; i < N; i++) a[i] = SETI32(i);
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < N; i++) a[i] = dot_u8s8(a[i], x, w, ones);
  }
  vi s = a[0]; for (int i = 1; i < N; i++) s = ADDI(s, a[i]);
  return hsumi(s);
}
__attribute__((noinline)) long chain(long iters) {
  long x = 0;
  for (long k = 0; k < iters; k++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return x;
}
int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 100000000L;
  int threads = omp_get_max_threads();
  volatile double sink = 0;
  double t = now(); sink += chain(iters); double ghz = 4.0 * iters / (now() - t) / 1e9;
  t = now();
#pragma omp parallel reduction(+:sink)
  sink += fma_loop(iters / 4);
  double fmacs = (double)threads * (iters / 4) * N * FLANES / (now() - t);
  t = now();
#pragma omp parallel reduction(+:sink)
  sink += int8_loop(iters / 4);
  double imacs = (double)threads * (iters / 4) * N * ILANES / (now() - t);
  printf("%d %.4f %.6e %.6e %g\n", threads, ghz, fmacs, imacs, (double)(sink != 0));
  return 0;
}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpu_peak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200_000_000, help="loop trips (default 2e8: a few seconds)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every CPU")
    p.add_argument("--rounds", type=int, default=3, help="runs; the best of each rate is reported (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = cpu_flags() or frozenset()
    if shutil.which("gcc") is None:
        print("cpu_peak.py: error: needs gcc", file=sys.stderr)
        return 2
    wide = "avx512f" in flags and "avx512bw" in flags
    vnni = wide and "avx512_vnni" in flags
    if not wide and not ({"avx2", "fma"} <= flags):
        print(f"cpu_peak.py: error: needs AVX2+FMA or AVX-512 (this CPU: {isa_summary()})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(KERNEL)
        isa = ["-mavx512f", "-mavx512bw"] + (["-mavx512vnni"] if vnni else []) if wide else ["-mavx2", "-mfma"]
        subprocess.run(["gcc", "-O2", "-fopenmp", *isa, f"-DWIDE={int(wide)}", f"-DVNNI={int(vnni)}",
                        str(src), "-o", str(exe)], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_PROC_BIND": "spread"}
        rows = [subprocess.run([str(exe), str(args.iterations)], env=env, check=True, capture_output=True,
                               text=True).stdout.split() for _ in range(args.rounds)]
    threads = int(rows[0][0])
    ghz, fmacs, imacs = (max(float(r[i]) for r in rows) for i in (1, 2, 3))
    int8_form = "VPDPBUSD zmm" if vnni else "VPMADDUBSW+VPMADDWD+VPADDD " + ("zmm" if wide else "ymm")
    print(json.dumps({
        "cpu_isa": isa_summary(), "threads": threads, "clock_ghz_one_core": round(ghz, 3),
        "fp32_form": "VFMADD " + ("zmm" if wide else "ymm"), "int8_form": int8_form,
        "fp32_gmac_s": round(fmacs / 1e9, 1), "int8_gmac_s": round(imacs / 1e9, 1),
        "fp32_macs_per_cycle_core": round(fmacs / threads / (ghz * 1e9), 2),
        "int8_macs_per_cycle_core": round(imacs / threads / (ghz * 1e9), 2),
        "int8_over_fp32": round(imacs / fmacs, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
