"""Compiles the linear-attention, sparse-estimator and context-parallel merge CUDA kernels with NVRTC, no GPU needed (a
compile check of the sources as the library assembles them: common.cuh + linear_common.cuh + the
kernel file, or common.cuh + fwd_params.cuh + a causal mask program + sparse_vs.cu; the library's
NVRTC options, one variant per (file, warps, gate, dtype, head dims, tiles, soft-cap)).

    python3 -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12
    /tmp/nvrtc/bin/python scripts/nvrtc_check.py [--arch sm_90a]

Prints one line per variant (PASS, or FAIL with NVRTC's log) and exits non-zero on a failure.
Runtime behaviour is the emulator's (scripts/linear_emu) and the device selftest's to check.
"""
import argparse
import ctypes
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KD = os.path.join(HERE, "..", "crates", "longattn", "src", "cuda", "kernels")


def load_nvrtc():
    cands = []
    try:
        import nvidia.cuda_nvrtc as m  # the PyPI wheel

        base = list(m.__path__)[0]
        cands += sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    cands += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for c in cands:
        if "alt" in os.path.basename(c) or "builtins" in os.path.basename(c):
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    sys.exit("libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12 (or put the toolkit's lib64 on LD_LIBRARY_PATH)")


def compile_src(lib, name, src, opts):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    a = ap.parse_args()
    lib = load_nvrtc()
    read = lambda f: open(os.path.join(KD, f)).read()  # noqa: E731
    head = read("common.cuh") + "\n" + read("linear_common.cuh") + "\n"
    variants = []
    for f16 in (0, 1):
        for k, v in ((64, 64), (128, 128), (64, 128)):
            for gla in (0, 1):
                variants.append(("linear_fwd.cu", 16, gla, f16, k, v, v))
                variants.append(("linear_seg.cu", 8, gla, f16, k, v, min(v, 64)))
                variants.append(("linear_bwd.cu", 8, gla, f16, k, v, min(v, 64)))
            variants.append(("linear_fwd.cu", 8, 0, f16, k, v, min(v, 64)))
            variants.append(("linear_step.cu", 8, 0, f16, k, v, min(v, 64)))
    bad = 0
    # The sparse estimator (sparse/cuda.rs): the forward's parameter struct and a mask program
    # shaped like the generated ones (mask/codegen.rs).
    causal = (
        "template <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {\n"
        "    const int pos = i + p.Sk - p.Sq;\n    (void)b; (void)h;\n    return j <= pos + p.mc[0];\n}\n"
    )
    sp_head = read("common.cuh") + "\n" + read("fwd_params.cuh") + "\n" + causal + "\n" + read("select.cuh") + "\n"
    def check_variant(name, src, tag, defs):
        nonlocal bad
        opts = [f"--gpu-architecture={a.arch}", "--std=c++17", "-default-device", "-lineinfo"]
        opts += [f"-D{x}={y}" for x, y in defs.items()]
        rc, log = compile_src(lib, name, src, opts)
        variants.append(tag)
        if rc == 0:
            print(f"PASS {tag}")
        else:
            bad += 1
            print(f"FAIL {tag}\n{log}")

    vs_src = sp_head + read("sparse_vs.cu")
    for f16 in (0, 1):
        for d, br, bc in ((64, 192, 128), (128, 128, 128), (128, 192, 64), (256, 64, 64)):
            for cap in (0, 1):
                defs = dict(LA_F16=f16, LA_D=d, LA_BR=br, LA_BC=bc, LA_SOFTCAP=cap)
                tag = f"sparse_vs.cu {'f16' if f16 else 'bf16'} D{d} {br}x{bc} softcap{cap}"
                check_variant("sparse_vs.cu", vs_src, tag, defs)
    # The low-bit estimator (sparse_lowbit.cu after sparse_vs.cu, LB_D32 = D rounded up to 32;
    # one stage and two blocks per SM as in sparse/cuda.rs, the f16 variants with the other
    # setting of the tuning override).
    lb_src = vs_src + "\n" + read("sparse_lowbit.cu")
    for f16 in (0, 1):
        for d, br, bc in ((64, 192, 128), (128, 128, 128), (80, 128, 64), (256, 64, 64), (128, 176, 80)):
            for cap in (0, 1):
                d32 = (d + 31) // 32 * 32
                defs = dict(LA_F16=f16, LA_D=d, LA_BR=br, LA_BC=bc, LA_SOFTCAP=cap, LB_D32=d32,
                            LB_WARPS=8 if d32 <= 128 else 4, LB_STAGES=1 + f16, LB_MINB=2 - f16)
                tag = f"sparse_lowbit.cu {'f16' if f16 else 'bf16'} D{d} {br}x{bc} softcap{cap}"
                check_variant("sparse_lowbit.cu", lb_src, tag, defs)
    # The gathered `columns` estimator (sparse/columns.rs: sparse_columns.cu after sparse_vs.cu),
    # sampled rows per query tile 1 / 4 / 8 / 5 (tiles per block 64 / 16 / 8 / 12).
    cl_src = vs_src + "\n" + read("sparse_lowbit.cu") + "\n" + read("sparse_columns.cu")
    for f16 in (0, 1):
        for d, br, bc, r in ((64, 128, 128, 8), (128, 128, 128, 4), (96, 128, 128, 1), (256, 64, 64, 5)):
            for cap in (0, 1):
                chains = 1 + cap   # the product's one or two accumulator chains
                int8 = cap ^ f16   # the int8 estimate in half of the variants
                defs = dict(LA_F16=f16, LA_D=d, LA_BR=br, LA_BC=bc, LA_SOFTCAP=cap, CL_R=r, CL_CHAINS=chains,
                            CL_INT8=int8, LB_D32=(d + 31) // 32 * 32, LB_WARPS=8, LB_STAGES=1, LB_MINB=2,
                            LA_GATHERED_BIT="2147483648u", LA_PAD="2147483647u")
                tag = (f"sparse_columns.cu {'f16' if f16 else 'bf16'} D{d} {br}x{bc} rows{r} softcap{cap} "
                       f"chains{chains} int8{int8}")
                check_variant("sparse_columns.cu", cl_src, tag, defs)
    # The KV-cache kernels (cuda/decode.rs, kv/cuda.rs): decode (paged / contiguous, the ring),
    # the append / move / fill helpers, and the Quest selection.
    kv = []
    for f16 in (0, 1):
        for d in (64, 128, 256):
            for g, page, u, ns, mma in ((4, 16, 4, 3, 0), (8, 0, 2, 0, 0), (1, 64, 4, 3, 0), (4, 16, 4, 3, 1),
                                        (8, 0, 4, 2, 1), (1, 64, 4, 4, 1)):
                if mma and d > 128:
                    continue
                kv.append(("decode.cu", dict(LA_F16=f16, LA_D=d, LA_G=g, LA_PAGE=page, LA_SOFTCAP=f16,
                                             LA_WARPS=4, LA_U=u, LA_MERGE_ONLY=0, LA_NS=ns, LA_MMA=mma), ""))
                if mma and page:  # the page read one copy ahead (LONGATTN_CUDA_DECODE_PAGE_AHEAD=1)
                    kv.append(("decode.cu", dict(LA_F16=f16, LA_D=d, LA_G=g, LA_PAGE=page, LA_SOFTCAP=f16,
                                                 LA_WARPS=4, LA_U=u, LA_MERGE_ONLY=0, LA_NS=ns, LA_MMA=mma,
                                                 LA_PAGE_AHEAD=1), ""))
            # Quest: the score kernel's pages per lane group (LQ_SPP) at its default and at 1
            # and the register select's prefix passes (LQ_PREFIX) on and off
            kv.append(("kv_quest.cu", dict(LA_F16=f16, LA_D=d, LA_PAGE=16, LQ_SPP=3 if d != 64 else 1,
                                           LQ_PREFIX=1 if d != 64 else 0),
                       read("select.cuh")))
            # The decode kernel folding press scores (LA_SCORE: tensor-core path, per-head pages),
            # its kind (0 H2O, 1 A2SF, 2 TOVA) and group reduction (0 max, 1 sum, 2 mean) compiled
            # in: every pair for bf16 D 128 at each group size, one pair (in turn) otherwise.
            if d <= 128:
                for g in (1, 4, 8):
                    folds = [(k, r) for k in range(3) for r in range(3)]
                    if (f16, d) != (0, 128):
                        folds = [folds[len(kv) % len(folds)]]
                    for kind, red in folds:
                        # H2O's fold as a reduction at L2 (the default), the copy of the old scores
                        # (LONGATTN_CUDA_DECODE_FOLD_RED=0) on the group's sum
                        kv.append(("decode.cu", dict(LA_F16=f16, LA_D=d, LA_G=g, LA_PAGE=16, LA_SOFTCAP=f16,
                                                     LA_WARPS=4, LA_U=4, LA_MERGE_ONLY=0, LA_NS=3, LA_MMA=1,
                                                     LA_SCORE=1, LA_SCORE_KIND=kind, LA_SCORE_REDUCE=red,
                                                     LA_SCORE_RED=int(kind == 0 and red != 1)), ""))
            # Press scores (kv/score_cuda.rs), with and without soft-cap.
            for cap in (0, 1):
                kv.append(("kv_score.cu", dict(LA_F16=f16, LA_D=d, LA_PAGE=16, LA_SOFTCAP=cap), ""))
        kv.append(("kv_append.cu", dict(LA_F16=f16), ""))
        # KIVI pages (kv/kivi_cuda.rs): decode.cu's parameters, finish and merge, then kv_kivi.cu's
        # quantizer and decode, per (head dim, bits, group).
        for d, qb, qg, g in ((128, 4, 32, 4), (128, 2, 64, 8), (64, 4, 16, 1), (64, 2, 64, 4), (256, 4, 32, 4),
                             (256, 2, 64, 1)):
            kv.append(("kv_kivi.cu", dict(LA_F16=f16, LA_D=d, LA_G=g, LA_PAGE=16, LA_SOFTCAP=f16, LA_WARPS=4,
                                          LA_U=4, LA_MERGE_ONLY=0, LA_NS=3, LA_MMA=1, LA_KIVI=1, LA_QB=qb,
                                          LA_QG=qg, KQ_MINB=2 if d > 128 else 3), read("decode.cu")))
    for f, defs, extra in kv:
        tag = f"{f} " + " ".join(f"{x}={y}" for x, y in defs.items())
        check_variant(f, read("common.cuh") + "\n" + extra + "\n" + read(f), tag, defs)
    # The ring's LSE merge of the one-GPU loopback (cp/loopback.rs): common.cuh + cp_merge.cu.
    for f16 in (0, 1):
        tag = f"cp_merge.cu {'f16' if f16 else 'bf16'}"
        check_variant("cp_merge.cu", read("common.cuh") + "\n" + read("cp_merge.cu"), tag, dict(LA_F16=f16))
    for f, nw, gla, f16, k, v, bv in (x for x in variants if isinstance(x, tuple)):
        defs = dict(LIN_NW=nw, LA_F16=f16, LIN_K=k, LIN_V=v, LIN_BV=bv, LIN_BK=32)
        if gla:
            defs["LIN_GLA"] = 1
        opts = [f"--gpu-architecture={a.arch}", "--std=c++17", "-default-device", "-lineinfo"]
        opts += [f"-D{x}={y}" for x, y in defs.items()]
        rc, log = compile_src(lib, f, head + read(f), opts)
        tag = f"{f} NW{nw} GLA{gla} {'f16' if f16 else 'bf16'} K{k} V{v} BV{bv}"
        if rc == 0:
            print(f"PASS {tag}")
        else:
            bad += 1
            print(f"FAIL {tag}\n{log}")
    print(f"{len(variants) - bad} / {len(variants)} compiled")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
