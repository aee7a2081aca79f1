"""benchmarks/kernel_profile.py: kernel names sorted into kinds, and the profile of a real
--backend torch repository on the CPU (the GPU run: tests/gpu/test_gpu.py)."""

from __future__ import annotations

import pytest

from dart_triton.benchmarks import kernel_profile
from tests.helpers import read_csv

# Names as the PyTorch profiler reports them: CUDA kernels seen on Hopper GPUs (cuBLAS,
# cuBLASLt's nvjet, flash and memory-efficient SDPA, ATen, Triton from torch.compile) and
# the CPU's ATen operators.
NAMES = [
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_"
     "execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("void cudnn::cnn::implicit_convolve_sgemm<float, float, 1024, 5, 5, 3, 3, 3, 1>", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, "
     "false, cutlass::half_t>>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassF_f16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel"
     "<cutlass::half_t, cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)",
     "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>",
     "normalisation"),
    ("triton_red_fused_native_layer_norm_0", "normalisation"),
    ("triton_per_fused__softmax_3", "normalisation"),
    ("triton_poi_fused_add_gelu_1", "pointwise"),
    ("triton_poi_fused__to_copy_2", "pointwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
     "pointwise"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("Memset (Device)", "copy"),
    ("aten::addmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::mkldnn_convolution", "matmul"),
    ("aten::native_layer_norm", "normalisation"),
    ("aten::copy_", "copy"),
    ("aten::view", "overhead"),
    ("aten::as_strided", "overhead"),
    ("aten::gelu", "pointwise"),
    ("some_vendor_kernel_we_do_not_know", "other"),
]


@pytest.mark.parametrize("name, kind", NAMES)
def test_kernel_names_sort_into_kinds(name, kind):
    assert kernel_profile.kind_of(name) == kind


def test_by_kind_sums_each_kind_and_names_every_kind():
    kernels = [kernel_profile.Kernel("nvjet_hsh_x", 2.0, 4),
               kernel_profile.Kernel("sm90_xmma_gemm_y", 1.0, 2),
               kernel_profile.Kernel("flash_fwd_kernel", 0.5, 1)]
    kinds = kernel_profile.by_kind(kernels)
    assert list(kinds) == kernel_profile.KIND_NAMES
    assert kinds["matmul"] == 3.0 and kinds["attention"] == 0.5 and kinds["copy"] == 0.0


def test_profile_of_a_torch_repository_accounts_for_its_time(torch_repository, tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    argv = ["--repo", str(torch_repository), "--classes", "3", "--iters", "2",
            "--stem", "kp", "--out", str(out), "--results", str(results)]
    assert kernel_profile.main(argv) == 0

    rows = {r["graph"]: r for r in read_csv(out / "kp.csv")}
    assert set(rows) == {"backbone", "enc_dec"} and rows["enc_dec"]["prompts"] == 3
    for row in rows.values():
        assert 0 < row["device_ms"] <= row["wall_ms"] * 1.05
        assert row["gflop"] > 0 and row["tflops"] > 0
        shares = [row[f"{k}_pct"] for k in kernel_profile.KIND_NAMES]
        assert sum(shares) == pytest.approx(100, abs=0.1)
        assert row["matmul_pct"] > 0 and row["attention_pct"] > 0  # SDPA in both graphs
    kernels = read_csv(out / "kp_kernels.csv")
    assert {k["graph"] for k in kernels} == {"backbone", "enc_dec"}
    assert all(k["device"] == "cpu" and k["kernel"].startswith("aten::") for k in kernels)
    section = results.read_text().split("<!-- BEGIN kp -->")[1].split("<!-- END kp -->")[0]
    assert "**without CUDA graphs**" in section and "- command:" in section
    assert "| backbone | - |" in section and "| enc_dec | 3 |" in section


def test_more_classes_than_the_repository_takes_is_one_usage_line(torch_repository, tmp_path,
                                                                  capsys):
    from tests.conftest import TEST_MAX_CLASSES

    with pytest.raises(SystemExit) as e:
        kernel_profile.main(["--repo", str(torch_repository), "--classes",
                             str(TEST_MAX_CLASSES + 1), "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"is more than the repository's max {TEST_MAX_CLASSES}" in err
