"""The probe behind moe_gpu_wgrad_probe.json, as it ran on the H200 at commit 9796619 (its
_weight_grad_kernel took P_GATHER/Q_GATHER and P_BY_ROWS, since removed: the kernel now always
reads pregathered rows). Kept as the record of how those figures were taken; it does not run
against the current kernel."""
import sys, time, json
import torch, triton
from moesys_compile.kernels import grouped_mlp_backward as gb

T, D, F, E, K = [int(v) for v in sys.argv[1].split(",")]
LIMIT = float(sys.argv[2])
t0 = time.time()
N = T * K
torch.manual_seed(0)
dev = "cuda"
counts = torch.full((E,), N // E, dtype=torch.int64, device=dev)
starts = counts.cumsum(0) - counts
slots = torch.randperm(N, device=dev)
src = slots // K
x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
grad_h = torch.randn(N, 2 * F, device=dev, dtype=torch.bfloat16)
grad_y = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
wa = torch.randn(N, F, device=dev, dtype=torch.bfloat16)
x_g = x[src].contiguous()
gy_g = grad_y[src].contiguous()
offs = counts.cumsum(0).to(torch.int32)

CASES = {  # name: (P, Q, I, J, P_GATHER, Q_GATHER)
    "dW_up gather": (grad_h, x, 2 * F, D, False, True),
    "dW_up pregathered": (grad_h, x_g, 2 * F, D, False, False),
    "dW_down gather": (grad_y, wa, D, F, True, False),
    "dW_down pregathered": (gy_g, wa, D, F, False, False),
}
CONFIGS = [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
rows = []

def flops(I, J):
    return 2 * N * I * J

def run(name, P, Q, I, J, pg, qg, cfg, by_rows, group_m):
    bm, bn, bk, w, st = cfg
    out = torch.empty(E, I, J, device=dev, dtype=torch.bfloat16)
    grid = (triton.cdiv(I, bm) * triton.cdiv(J, bn), E)
    fn = lambda: gb._weight_grad_kernel[grid](P, Q, out, counts, starts, slots, E, I, J, K, 0, P.stride(0), Q.stride(0),
                                              *out.stride(), P_GATHER=pg, Q_GATHER=qg, PRECISION="ieee", UPCAST=False,
                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, P_BY_ROWS=by_rows,
                                              num_warps=w, num_stages=st)
    try:
        ms = triton.testing.do_bench(fn, warmup=5, rep=30)
    except Exception as exc:
        print(name, cfg, by_rows, group_m, "ERR", str(exc).splitlines()[0][:150], flush=True)
        return None
    e = 3
    r0, r1 = int(starts[e]), int(starts[e] + counts[e])
    Pe = P[src[r0:r1]] if pg else P[r0:r1]
    Qe = Q[src[r0:r1]] if qg else Q[r0:r1]
    ref = (Pe.float().t() @ Qe.float())
    err = ((out[e].float() - ref).abs().max() / ref.abs().max()).item()
    row = dict(case=name, cfg=cfg, by_rows=by_rows, group_m=group_m, ms=ms, tflops=flops(I, J) / ms / 1e9, relerr=err)
    print(row, flush=True)
    rows.append(row)
    return ms

# references
for name, (P, Q, I, J, pg, qg) in CASES.items():
    if pg or qg:
        continue
    ms = triton.testing.do_bench(lambda: [torch.mm(P[i * (N // E):(i + 1) * (N // E)].t(), Q[i * (N // E):(i + 1) * (N // E)]) for i in range(E)], warmup=5, rep=30)
    print({"case": name, "ref": "cublas loop", "ms": ms, "tflops": flops(I, J) / ms / 1e9}, flush=True)
    try:
        ms = triton.testing.do_bench(lambda: torch._grouped_mm(P.t(), Q, offs=offs), warmup=5, rep=30)
        print({"case": name, "ref": "_grouped_mm", "ms": ms, "tflops": flops(I, J) / ms / 1e9}, flush=True)
    except Exception as exc:
        print(name, "_grouped_mm ERR", str(exc)[:200])

for cfg in CONFIGS:
    for name, (P, Q, I, J, pg, qg) in CASES.items():
        for by_rows in (False, True):
            if time.time() - t0 > LIMIT:
                break
            run(name, P, Q, I, J, pg, qg, cfg, by_rows, 8)
# group order effect on the best of each case
for name in CASES:
    mine = [r for r in rows if r["case"] == name]
    if mine and time.time() - t0 < LIMIT:
        best = min(mine, key=lambda r: r["ms"])
        P, Q, I, J, pg, qg = CASES[name]
        run(name, P, Q, I, J, pg, qg, best["cfg"], best["by_rows"], 1)
print("BEST")
for name in CASES:
    mine = [r for r in rows if r["case"] == name]
    if mine:
        print(min(mine, key=lambda r: r["ms"]))
