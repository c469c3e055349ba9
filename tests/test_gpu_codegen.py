"""The Triton kernels of kd_loss, feature_loss, spectral_norms and RKD's angle loss compile for sm_80 and sm_90
(PTX), without a GPU.

The CPU test-suite runs these kernels under the Triton interpreter, which executes Python and so cannot see
errors that only the GPU code generator raises (a loop-carried variable changing type, say). This compiles a
representative set of their specialisations ahead of time, in a subprocess (the interpreter replaces
``triton.jit`` for the whole process once TRITON_INTERPRET=1 is set).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastkd.kernel_args import Divergence, Ensemble, FeatureGroup, FeatureKind, FeatureNormalize
    from fastkd.kernels import features, kd, lipschitz, relational

    def compile_for(fn, signature, constexprs, arch):
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))

    f32 = "*fp32"
    strides = "s_n s_c s_s t_n t_c t_s m_n m_c m_s".split()
    feature_inputs = {"STUDENT": "*bf16", "TEACHER": "*bf16", "M": "*u8", "MARGIN": f32}
    forward = {**feature_inputs, "TERMS": f32, "WEIGHTS": f32, "num_c": "i64", "num_s": "i64",
               **dict.fromkeys(strides, "i64"), "beta": "fp32"}
    backward = {**feature_inputs, "SCALE": f32, "GRAD_S": "*bf16", "GRAD_T": "*bf16", "num_c": "i64", "num_s": "i64",
                **dict.fromkeys(strides + "gs_n gs_c gs_s gt_n gt_c gt_s".split(), "i64"), "beta": "fp32"}
    # (KIND, NORMALIZE, GROUP, HAS_MARGIN): every branch of the kernels at least once
    feature_cases = [("MSE", "NONE", "CHANNEL", True), ("SMOOTH_L1", "STANDARDIZE", "CHANNEL", False),
                     ("L1", "STANDARDIZE", "SAMPLE", False), ("MSE", "L2", "POSITION", False),
                     ("COSINE", "NONE", "POSITION", False), ("COSINE", "L2", "POSITION", False)]
    for kind, normalize, group, margin in feature_cases:
        kind, normalize, group = FeatureKind[kind], FeatureNormalize[normalize], FeatureGroup[group]
        options = dict(KIND=int(kind), NORMALIZE=int(normalize), GROUP=int(group), HAS_MASK=True, HAS_MARGIN=margin,
                       BLOCK=256)
        for arch in (80, 90):
            compile_for(features.feature_forward_kernel, {**forward, **dict.fromkeys(options, "constexpr")},
                        options, arch)
            options_b = {**options, "TEACHER_GRAD": True}
            compile_for(features.feature_backward_kernel, {**backward, **dict.fromkeys(options_b, "constexpr")},
                        options_b, arch)
    step = {"POINTERS": "*i64", "TABLE": "*i64", "TILE_MATRIX": "*i32", "TILE_INDEX": "*i32", "U": f32, "V": f32,
            "A": f32, "PARTIALS": f32, "ARRIVALS": "*i32", "U_OUT": f32, "V_OUT": f32, "SIGMA": f32, "eps": "fp32"}
    for arch in (80, 90):
        for element in (tl.float32, tl.bfloat16):
            options = dict(ELEMENT=element, NUM_FIELDS=lipschitz.NUM_FIELDS, BLOCK_R=lipschitz.BLOCK_R,
                           BLOCK_C=lipschitz.BLOCK_C, FINISH_BLOCK=lipschitz.FINISH_BLOCK)
            compiled = compile_for(lipschitz.power_step_kernel, {**step, **dict.fromkeys(options, "constexpr")},
                                   options, arch)
            # the last-tile handoff: an acquire-release atomic at GPU scope (Triton puts a bar.sync before it)
            assert re.search(r"atom(?=[.\w]*\.gpu)(?=[.\w]*\.acq_rel)[.\w]*\.add", compiled.asm["ptx"]), "handoff"
    scalars = "inv_temperature beta one_minus_beta log_beta log_one_minus_beta ce_weight kd_scale alpha".split()
    kd_common = {"V": "i64", "stride_s_row": "i64", "stride_s_col": "i64", "stride_t_teacher": "i64",
                 "stride_t_row": "i64", "stride_t_col": "i64", "stride_labels": "i64", "num_rows": "i64",
                 "num_teachers": "i32",
                 "ignore_index": "i64", **dict.fromkeys(scalars, "fp32")}
    kd_rows = {"STUDENT": "*bf16", "TEACHER": "*bf16", "WEIGHTS": f32, "LABELS": "*i64"}
    kd_forward = {**kd_rows, "LOSS": f32, "STATS": f32, "METRICS": f32, **kd_common}
    kd_backward = {**kd_rows, "STATS": f32, "GRAD_LOSS": f32, "GRAD_S": "*bf16", "GRAD_T": "*bf16",
                   "stride_grad_loss": "i64", **kd_common}
    # (DIVERGENCE, ENSEMBLE, TEACHERS): every divergence with one teacher, and both ensembles
    ensembles = [(Divergence.KL, Ensemble.PROB, 4), (Divergence.JSD, Ensemble.PROB, 4),
                 (Divergence.REVERSE_KL, Ensemble.LOGIT, 2)]
    cases = [(divergence, Ensemble.NONE, 1) for divergence in Divergence] + ensembles
    for divergence, ensemble, teachers in cases:
        options = dict(DIVERGENCE=int(divergence), HAS_LABELS=True, HAS_CE=True, HAS_KD=True, INTERIOR_BETA=True,
                       ENSEMBLE=int(ensemble), TEACHERS=teachers, BLOCK=128)
        for arch in (80, 90):
            options_f = {**options, "HAS_METRICS": True}
            compile_for(kd.kd_forward_kernel, {**kd_forward, **dict.fromkeys(options_f, "constexpr")}, options_f,
                        arch)
            options_b = {**options, "TEACHER_GRAD": ensemble == Ensemble.NONE}
            compile_for(kd.kd_backward_kernel, {**kd_backward, **dict.fromkeys(options_b, "constexpr")}, options_b,
                        arch)
    # teacher weights that arrive as float64 (a float64 default dtype) are read as float32
    options = dict(DIVERGENCE=int(Divergence.KL), HAS_LABELS=True, HAS_CE=True, HAS_KD=True, INTERIOR_BETA=True,
                   HAS_METRICS=True, ENSEMBLE=int(Ensemble.PROB), TEACHERS=4, BLOCK=128)
    compile_for(kd.kd_forward_kernel, {**kd_forward, "WEIGHTS": "*fp64", **dict.fromkeys(options, "constexpr")},
                options, 90)
    topk_common = {"V": "i64", "K": "i32", "stride_s_row": "i64", "stride_s_col": "i64", "stride_v_row": "i64",
                   "stride_v_col": "i64", "stride_i_row": "i64", "stride_i_col": "i64", "stride_labels": "i64",
                   "num_rows": "i64", "inv_temperature": "fp32", "inv_teacher_temperature": "fp32",
                   "ignore_index": "i64", "ce_weight": "fp32", "kd_scale": "fp32"}
    topk_forward = {"STUDENT": "*bf16", "VALUES": f32, "INDICES": "*i64", "LABELS": "*i64", "LOSS": f32, "STATS": f32,
                    "METRICS": f32, **topk_common}
    topk_backward = {"STUDENT": "*bf16", "VALUES": f32, "INDICES": "*i64", "LABELS": "*i64", "STATS": f32,
                     "GRAD_LOSS": f32, "GRAD_S": "*bf16", "stride_grad_loss": "i64", **topk_common}
    for bucket, spread in ((True, False), (True, True), (False, False)):  # bucket, spread and renormalize tails
        options = dict(HAS_LABELS=True, HAS_CE=True, HAS_KD=True, SPREAD=spread, BUCKET=bucket, TOPK=32, BLOCK=128)
        for arch in (80, 90):
            options_f = {**options, "HAS_METRICS": True}
            compile_for(kd.kd_topk_forward_kernel, {**topk_forward, **dict.fromkeys(options_f, "constexpr")},
                        options_f, arch)
            compile_for(kd.kd_topk_backward_kernel, {**topk_backward, **dict.fromkeys(options, "constexpr")},
                        options, arch)
    distances = {"D_S": f32, "D_T": f32}
    for arch in (80, 90):
        options = dict(BLOCK=64)
        constexprs = dict.fromkeys(options, "constexpr")
        compile_for(relational.rkd_angle_forward_kernel, {**distances, "PARTIAL": f32, "num": "i64", **constexprs},
                    options, arch)
        for kernel in (relational.rkd_angle_pair_grad_kernel, relational.rkd_angle_row_grad_kernel):
            compile_for(kernel, {**distances, "SCALE": f32, "GRAD": f32, "num": "i64", **constexprs}, options, arch)
        bank = {"BANK": "*bf16", "INDEX": "*i64", "num_c": "i64", "dim": "i64", "bank_stride": "i64"}
        options = dict(BLOCK_C=64, BLOCK_D=128)
        constexprs = dict.fromkeys(options, "constexpr")
        compile_for(relational.crd_gather_dot_kernel, {**bank, "ANCHORS": f32, "SCORES": f32, **constexprs},
                    options, arch)
        compile_for(relational.crd_score_grad_kernel, {**bank, "ANCHORS": f32, "Z": f32, "SCORES": f32, "OUT": f32,
                                                       "num_b": "i64", "chunk": "i64", "inv_temperature": "fp32",
                                                       "noise": "fp32", "grad_scale": "fp32", **constexprs},
                    options, arch)
        compile_for(relational.crd_scatter_dot_kernel, {**bank, "GRAD": f32, "OUT": f32, "num_b": "i64",
                                                        "chunk": "i64", **constexprs}, options, arch)
    print("compiled")
""")


def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this triton has no ptxas to compile with")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
