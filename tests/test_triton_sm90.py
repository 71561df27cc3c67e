"""The Triton kernels compile for the H100/H200 (sm_90) on a machine without a GPU: `triton.compile` of each
kernel with the constexprs, dtypes and warp counts kernels.py launches it with, down to the cubin (Triton's own
ptxas). CI has no GPU, so this is where a kernel that no longer compiles shows first; whether it computes the
right thing is tested on CUDA and under the interpreter (tests/test_kernels.py)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma4_coreai import kernels as K  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, ptrs: dict[str, str], consts: dict[str, int], num_warps: int, num_stages: int = 3) -> str:
    """Compile `fn` (a @triton.jit kernel) for sm_90: pointer args typed by `ptrs`, other non-constexpr args i32."""
    names = fn.arg_names
    assert set(ptrs) | set(consts) <= set(names), sorted(set(ptrs) | set(consts) - set(names))
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    kernel = triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})
    assert kernel.asm["cubin"], "no cubin"
    return kernel.asm["ptx"]


def _cfg_id(c) -> str:
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['GROUPS']}w{c.num_warps}"


@pytest.mark.parametrize("cfg", K._gemv_configs(), ids=_cfg_id)
@pytest.mark.parametrize("xt", ["bf16", "fp16"])
def test_q4_gemv_compiles(cfg, xt):
    ptx = compile_sm90(K._q4_gemv_kernel, {"x_ptr": f"*{xt}", "w_ptr": "*u8", "s_ptr": "*fp16", "out_ptr": "*fp32"},
                       cfg.kwargs, cfg.num_warps, cfg.num_stages)
    assert ".target sm_90" in ptx


@pytest.mark.parametrize("out", ["bf16", "fp16", "fp32"])
def test_q4_dequant_compiles(out):
    compile_sm90(K._q4_dequant_kernel, {"w_ptr": "*u8", "s_ptr": "*fp16", "out_ptr": f"*{out}"},
                 {"BLOCK_N": 16, "GROUPS": 8}, 4)


# E4B's head dims: 256 on sliding layers, 512 on full ones (8 warps there, as decode_attention_triton picks)
@pytest.mark.parametrize("d, g", [(256, 4), (512, 4), (64, 2)])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_decode_attention_compiles(d, g, dt):
    ptx = compile_sm90(K._decode_attn_split_kernel,
                       {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "mask_ptr": "*u8",
                        "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"},
                       {"G": g, "GP": K.DECODE_ATTN_GROUP, "D": d, "BLOCK_T": K.DECODE_ATTN_BLOCK_T},
                       8 if d >= 512 else 4)
    assert "mma" in ptx  # the two tl.dot products run on tensor cores
    compile_sm90(K._decode_attn_combine_kernel,
                 {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": f"*{dt}"},
                 {"G": g, "D": d, "SP": 64, "BLOCK_D": min(d, 64)}, 4)
