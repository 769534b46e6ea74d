#!/usr/bin/env python
"""Benchmark the fused distillation losses against the naive PyTorch references (forward + backward).

Each (loss, implementation) pair runs in a fresh subprocess so peak memory is measured cleanly:
on CPU the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after the inputs
exist) minus the resident memory at that point; on CUDA torch.cuda.max_memory_allocated minus the
allocation after the inputs exist. Both include every gradient the loss hands back. Naive and fused
workers alternate for ``--rounds`` rounds (so a burst of load from other jobs hits both); each times
``--repeats`` forward+backward runs (after one warm-up on CUDA). Reported: the best wall time and the
best process CPU time (all threads; less sensitive to other jobs on a shared CPU). The table goes to
docs/benchmarks-kernels.md.

    python scripts/bench_kernels.py                       # CPU, vocabulary 250,002, hidden 384, 2,048 tokens
    python scripts/bench_kernels.py --device cuda --hidden 768 --tokens 8192 --dtype bf16
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ worker
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_inputs(case: str, args, device, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False, dt=None):
        x = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt or dtype)
        return x.requires_grad_(grad)

    if case == "logit":
        n, v, h = args.tokens, args.vocab, args.hidden
        return dict(student_hidden=rnd(n, h, grad=True), student_weight=rnd(v, h, scale=0.05, grad=True),
                    student_bias=rnd(v, scale=0.1, grad=True), teacher_hidden=rnd(n, h),
                    teacher_weight=rnd(v, h, scale=0.05), teacher_bias=rnd(v, scale=0.1))
    if case == "hidden":
        b, length, h = args.tokens // 128, 128, args.hidden
        students = [rnd(b, length, h, grad=True) for _ in range(args.layers)]
        teachers = [rnd(b, length, 2 * h, dt=dtype) for _ in range(args.layers)]
        mask = (torch.arange(length)[None, :] < torch.randint(16, length + 1, (b, 1), generator=g)).to(device)
        dims = torch.arange(0, 2 * h, 2, device=device)
        return dict(student=students, teacher=teachers, mask=mask, teacher_dims=dims)
    if case == "attention":
        b, length = args.tokens // 128, 128
        heads_s, heads_t = 6, 12
        d_s, d_t = args.hidden // heads_s, 64
        mask = (torch.arange(length)[None, :] < torch.randint(16, length + 1, (b, 1), generator=g)).to(device)
        return dict(student_q=rnd(b, heads_s, length, d_s, grad=True), student_k=rnd(b, heads_s, length, d_s,
                                                                                  grad=True),
                    teacher_q=rnd(b, heads_t, length, d_t), teacher_k=rnd(b, heads_t, length, d_t),
                    attention_mask=mask)
    raise ValueError(case)


def _flops_bytes(case: str, inputs, args) -> tuple[float, float]:
    """Useful FLOPs of forward+backward and bytes a fused pass must at least move (for TFLOP/s, GB/s)."""
    if case == "logit":
        n, v, h = args.tokens, args.vocab, args.hidden
        ht = inputs["teacher_hidden"].shape[1]
        flops = 2 * n * v * (h + ht) + 2 * 2 * n * v * h  # two head matmuls, two gradient matmuls
        el = inputs["student_weight"].element_size()
        return flops, (2 * v * h + v * h) * el + v * h * 4  # read both heads, write the weight gradient
    if case == "hidden":
        total = sum(s.numel() * s.element_size() * 2 + t.numel() // 2 * t.element_size()
                    for s, t in zip(inputs["student"], inputs["teacher"]))
        return 3 * sum(s.numel() for s in inputs["student"]), total
    q, tq = inputs["student_q"], inputs["teacher_q"]
    b, hs, length, ds = q.shape
    ht, dt_ = tq.shape[1], tq.shape[3]
    flops = 2 * b * length * length * (ht * dt_ + hs * ds) + 3 * 2 * b * hs * length * length * ds
    return flops, sum(x.numel() * x.element_size() for x in (q, inputs["student_k"], tq, inputs["teacher_k"]))


def worker(args) -> dict:
    import torch

    os.environ["MLC_KERNELS"] = args.impl if args.impl in ("torch", "triton") else "torch"
    from mlc import kernels
    from mlc.kernels import reference

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    inputs = _make_inputs(args.case, args, device, dtype)
    grad_leaves = [x for x in (inputs.get("student") or []) + list(inputs.values())
                   if isinstance(x, torch.Tensor) and x.requires_grad]
    if args.case == "logit":
        kw = dict(kind=args.kind, temperature=args.temperature)
        if args.impl == "naive":
            def run():
                return reference.linear_logit_distill(**inputs, **kw)
        else:
            def run():
                return kernels.linear_logit_distill(**inputs, **kw, memory_budget_bytes=args.budget)
    elif args.case == "hidden":
        if args.impl == "naive":
            def run():
                return reference.hidden_mse(inputs["student"], inputs["teacher"], inputs["mask"],
                                            inputs["teacher_dims"])
        else:
            def run():
                return kernels.hidden_mse(**inputs)
    else:
        if args.impl == "naive":
            def run():
                return reference.attention_map_mse(**inputs)
        else:
            def run():
                return kernels.attention_map_mse(**inputs)

    def step():
        for x in grad_leaves:
            x.grad = None
        loss = run()
        loss.backward()
        return float(loss)

    cuda = device.type == "cuda"
    loss = None
    if cuda:
        loss = step()  # warm-up (Triton compilation, cuBLAS handles, allocator)
        for x in grad_leaves:
            x.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
        base = _rss_bytes("VmRSS")
    times, cpu_times = [], []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - base
    flops, nbytes = _flops_bytes(args.case, inputs, args)
    best = min(times)
    return dict(case=args.case, impl=args.impl, loss=loss, time_s=best, times=times, cpu_s=min(cpu_times),
                peak_bytes=peak, flops=flops, bytes=nbytes)


# ------------------------------------------------------------------------------------------------ driver
def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def _run_worker(args, case: str, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--impl", impl]
    for key in ("device", "dtype", "tokens", "vocab", "hidden", "layers", "kind", "temperature", "repeats",
                "rounds"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        if out.returncode == -9:
            return dict(case=case, impl=impl, error="killed by SIGKILL (out of memory on this machine?)")
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return dict(case=case, impl=impl, error=f"exit {out.returncode}: {' | '.join(tail)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mb(b: float) -> str:
    return f"{b / 2 ** 20:,.0f} MiB" if b >= 2 ** 20 else "< 1 MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4, help="hidden-state pairs in the hidden MSE case")
    p.add_argument("--kind", default="kl", choices=["kl", "mse"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--budget", type=int, default=None, help="memory_budget_bytes of the fused logit loss")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per worker")
    p.add_argument("--rounds", type=int, default=2, help="alternating naive/fused workers per loss")
    p.add_argument("--cases", default="logit,hidden,attention")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement subprocess")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-kernels.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.temperature != 1.0 and args.kind == "mse":
        args.temperature = 1.0
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    fused = "triton" if args.device == "cuda" else "torch"
    rows = []
    for case in args.cases.split(","):
        runs = {"naive": [], fused: []}
        for rnd in range(args.rounds):
            for impl in ("naive", fused):
                print(f"[bench] {case} {impl} round {rnd + 1} ...", file=sys.stderr, flush=True)
                runs[impl].append(_run_worker(args, case, impl))
                print(f"[bench]   {runs[impl][-1]}", file=sys.stderr, flush=True)
        pair = {}
        for impl, results in runs.items():
            ok = [r for r in results if "error" not in r]
            if not ok:
                pair[impl] = results[-1]
                continue
            best = min(ok, key=lambda r: r["time_s"])
            label = f"{impl} ({len(ok)} of {len(results)} runs"
            failed = [r["error"] for r in results if "error" in r]
            label += f"; {len(failed)} failed: {failed[0]})" if failed else ")"
            pair[impl] = dict(best, label=label, times=[t for r in ok for t in r["times"]], cpu_s=min(r["cpu_s"] for r in ok),
                              peak_bytes=max(r["peak_bytes"] for r in ok),
                              tflops=best["flops"] / best["time_s"] / 1e12,
                              gbps=best["bytes"] / best["time_s"] / 1e9)
        rows.append((case, pair))

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = {"logit": f"linear logit distill ({args.kind}, T={args.temperature:g}): {args.tokens} tokens, "
                      f"vocabulary {args.vocab:,}, hidden {args.hidden}",
             "hidden": f"hidden MSE: {args.layers} pairs of [{args.tokens // 128}, 128, {args.hidden}] vs teacher "
                       f"{2 * args.hidden} (teacher_dims), masked",
             "attention": f"attention maps: [{args.tokens // 128}, 6 heads, 128, {args.hidden // 6}] vs "
                          "[12 heads, 64], masked"}
    lines = [f"### {date} - {args.device}, {args.dtype}", "",
             f"Machine: {_machine(args.device)}. Command: `python scripts/bench_kernels.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + ".", "",
             "| loss | implementation | wall time (best) | CPU time (best) | peak memory (max) | TFLOP/s | GB/s "
             "| loss value |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for case, pair in rows:
        for impl, r in pair.items():
            if "error" in r:
                lines.append(f"| {names[case]} | {impl} | failed: {r['error']} | | | | | |")
                continue
            lines.append(f"| {names[case]} | {r['label']} | {r['time_s']:.3f} s | {r['cpu_s']:.3f} s | "
                         f"{_fmt_mb(r['peak_bytes'])} | "
                         f"{r['tflops']:.3f} | {r['gbps']:.1f} | {r['loss']:.6g} |")
        a, b = pair.get("naive", {}), pair.get(fused, {})
        if "error" not in a and "error" not in b:
            mem = max(a["peak_bytes"], 2 ** 20) / max(b["peak_bytes"], 2 ** 20)
            tim = b["time_s"] / a["time_s"]
            cpu = b["cpu_s"] / a["cpu_s"]
            verdicts.append(f"- {case}: fused uses {mem:.1f}x less peak memory than naive and takes {tim:.2f}x "
                            f"its wall time ({cpu:.2f}x its CPU time).")
    lines += [""] + verdicts + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Fused distillation losses: benchmarks\n\n"
              "Written by `scripts/bench_kernels.py` (forward + backward of each loss; fused = Triton on CUDA, "
              "chunked PyTorch on CPU; naive = `kernels.reference`). Newest run first. Peak memory is what the "
              "loss adds on top of its inputs, gradients included; TFLOP/s counts the head and gradient "
              "matmuls (logit loss) and GB/s the least traffic a fused pass needs.\n\n"
              "No GPU was available on the machine these kernels were written on: the Triton kernels have been "
              "checked by the Triton interpreter on CPU (tests/kernels/test_kernels_triton.py) and compiled to sm_90 "
              "cubins (tests/kernels/test_kernels_triton_compile.py), but never run on a GPU or timed; "
              "runs below are CPU runs of the chunked PyTorch path unless their heading says cuda. The CPU is "
              "shared by several concurrent jobs, so times carry noise of tens of percent.\n\n")
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    body = old[old.index("### "):] if "### " in old else ""  # earlier runs and notes, without the old header
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(header + "\n".join(lines) + "\n" + body, encoding="utf-8")
    tmp.replace(args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
