"""The accuracy of Triton's ``input_precision="tf32x3"`` float32 products, emulated on the
CPU: each operand x is split into hi = tf32(x) and lo = tf32(x - hi) (round to nearest,
as ``cvt.rna.tf32.f32``) and a @ b is taken as hi_a hi_b + hi_a lo_b + lo_a hi_b (the
tensor cores' three products; the sums here in float64, so this is the split's own
error). Against float64, for the linears' shapes (5,000 rows, K input channels, 128
outputs), beside plain float32 and a single TF32 product.

    .venv-mace/bin/python benchmarks/tf32x3_accuracy.py
"""
import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32's 10 mantissa bits (to nearest, ties away from zero)."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def main() -> None:
    torch.manual_seed(0)
    print("| K | float32 | tf32x3 | tf32 |\n|---|---|---|---|")
    for k in (32, 128, 384):
        a, b = torch.randn(5000, k), torch.randn(k, 128) / k ** 0.5
        ref = a.double() @ b.double()
        ah, bh = tf32(a), tf32(b)
        al, bl = tf32(a - ah), tf32(b - bh)
        x3 = ah.double() @ bh.double() + ah.double() @ bl.double() + al.double() @ bh.double()

        def rel(y):
            return f"{((y.double() - ref).norm() / ref.norm()).item():.2e}"
        print(f"| {k} | {rel(a @ b)} | {rel(x3.float())} | {rel((ah.double() @ bh.double()).float())} |")


if __name__ == "__main__":
    main()
