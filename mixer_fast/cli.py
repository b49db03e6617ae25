"""The ``mixer-fast`` command: ``info`` (backends and why not), ``demo`` (the README's main job),
``report`` (the static compile report of the Triton kernels), ``roofline`` and ``convert-checkpoint``."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence

from . import __version__, dispatch


def _positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# Each report worker is a process of its own with Triton imported (~0.25 GB resident at its peak, measured);
# the cap keeps a many-core host from starting dozens for a 113-row report.
MAX_REPORT_JOBS = 8


def _report_jobs() -> int:
    """The CPUs this process may run on (the affinity mask, not the host's count), at most MAX_REPORT_JOBS."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, MAX_REPORT_JOBS))


def _versions() -> str:
    from importlib import metadata

    parts = [f"python {platform.python_version()}"]
    for dist in ("torch", "triton", "jax", "flax", "timm"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} -")
    return ", ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    print(f"mixer_fast {__version__} ({_versions()})")
    for framework in dispatch.FRAMEWORKS:
        print(f"\n{framework} backends (automatic choice in this order, per device):")
        for spec, ok, reason in dispatch.status(framework):
            state = "loaded" if ok else "unavailable"
            print(f"  {spec.name:<10} {state:<12} {reason}")
    print(_wins_text())
    print(_ptxas_text())
    print(_triton_choices_text())
    return 0


def _triton_choices_text() -> str:
    """The triton backend's per-process choices that a GPU measurement decides, and their overrides."""
    try:
        from .kernels.triton import matmul, token_mixing as tm
    except ImportError as e:
        return f"\ntriton kernels: not importable ({e})"
    try:
        engine, placement, token = matmul.gemm_engine(), matmul.ln_placement(), tm.token_engine()
    except ValueError as e:
        return f"\ntriton kernels: {e}"
    return (f"\ntriton channel GEMMs and ResMLP's token linear: {engine} ({matmul.GEMM_ENV}: {matmul.GEMM_FUSED} or "
            f"{matmul.GEMM_CUBLAS}; default {matmul.GEMM_ENGINE}), fc1's LayerNorm {placement} ({matmul.LN_ENV}: "
            f"{matmul.LN_ON_LOAD} or {matmul.LN_FOLDED}; default {matmul.LN_PLACEMENT})\n"
            f"triton token MLP: {token} ({tm.TOKEN_ENV}: {tm.TOKEN_FLASH} or {tm.TOKEN_CUBLAS}; default "
            f"{tm.TOKEN_ENGINE}), on the cuBLAS engine past {tm.FLASH_MAX_TOKENS} tokens unless "
            f"{tm.TOKEN_ENV}={tm.TOKEN_FLASH} is set")


def _wins_text() -> str:
    """The automatic choice's table of measured wins, as ``info`` prints it."""
    from . import wins

    lines = [f"\nautomatic choice: a fused backend runs only where a committed measurement shows it faster than the "
             f"reference\n(mixer_fast/{wins.TABLE_FILE}, generated from bench/results/ by bench/wins_table.py):"]
    rows = wins.table()["chosen"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["framework"], r["backend"], r["device_class"]), []).append(
            f"{r['op']} {r['mode']} {r['dtype']} ({r['min_speedup']:.2f}x)")
    for (framework, backend, device_class), items in sorted(groups.items()):
        lines.append(f"  {framework} {backend} on {device_class}: " + ", ".join(items))
    if not rows:
        lines.append("  none: the reference runs everywhere unless a backend is asked for by name")
    lines.append("  everything else: the reference (an explicit backend= or MIXER_FAST_BACKEND is always honoured)")
    return "\n".join(lines)


def _ptxas_text() -> str:
    """Which ptxas assembles the Triton kernels: on this machine's GPU, else for Hopper (what
    ``mixer-fast report`` compiles for)."""
    try:
        from .kernels.triton import toolchain
    except ImportError as e:
        return f"\nptxas: triton is not importable ({e})"
    arch, where = 90, "sm_90 (the static report's target; no GPU here)"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch, where = major * 10 + minor, f"sm_{major}{minor} ({torch.cuda.get_device_name()})"
    except ImportError:
        pass
    try:
        chosen = toolchain.choose(arch)
    except toolchain.ToolchainProblem as e:
        return f"\nptxas for {where}: none usable: {e}"
    lines = [f"\nptxas for {where}: {chosen.version_text} at {chosen.path}", f"  {chosen.source}: {chosen.why}"]
    for path, version, source in toolchain.others(chosen, arch):
        lines.append(f"  also here: {toolchain.version_text(version) if version else 'does not run'} at {path} "
                     f"({source})")
    # The JAX triton backend's kernels are assembled by XLA, with a ptxas of XLA's finding (looked for only
    # where jax-triton is installed: XLA's search runs ./bin/ptxas, relative to the working directory).
    if importlib.util.find_spec("jax_triton") is None:
        return "\n".join(lines)
    try:
        triton_ptxas, xla = toolchain.choose_for_jax(arch)
    except toolchain.ToolchainProblem as e:
        lines.append(f"  jax-triton's kernels: none usable: {e}")
    else:
        lines.append(f"  jax-triton's kernels: assembled by XLA with ptxas {xla.version_text} at {xla.path} "
                     f"({xla.source}); Triton writes their PTX for ptxas {triton_ptxas.version_text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# demo

class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, width: int = 28) -> None:
        self.total, self.done, self.width = total, 0, width

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label:<40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _time_ms(fn: Callable[[], object], iters: int, sync: Callable[[], None], progress: Progress, label: str) -> float:
    fn()  # warm-up (compilation, autotuning, allocator)
    sync()
    best = float("inf")
    for i in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        progress.step(f"{label} {i + 1}/{iters}")
    return best * 1e3


def _build_model(name: str, use_timm: bool):
    import torch

    from .reference import create_model, get_config

    cfg = get_config(name)
    if use_timm:
        import timm

        model = timm.create_model(cfg.timm_name, pretrained=False)
    else:
        model = create_model(cfg.name)
    # Pretrained weights cannot be downloaded here; perturb the init so that no bias or head is zero
    # (zeros would hide a wrong term in the comparison).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import convert

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        import timm  # noqa: F401
        use_timm = True
    except ImportError:
        use_timm = False
    source = "timm" if use_timm else "mixer_fast.reference (timm not installed)"
    backend = args.backend
    # The backends the converted blocks will run on in inference: the choice ops.py makes for each op.
    name = str(dtype).replace("torch.", "")
    per_op = {op: dispatch.choose("torch", device.type, backend, (name,), op=op, mode="forward", dtype=name,
                                  device_index=device.index).name for op in ("token_mixing", "channel_mixing")}
    chosen = "/".join(dict.fromkeys(per_op.values()))
    print(f"mixer_fast {__version__} demo: {args.model} from {source}, batch {args.batch}, {args.dtype}, "
          f"{device} ({torch.get_num_threads()} threads)")
    if chosen == "reference":
        print(f"note: the reference backend runs here (plain eager PyTorch, the spec the kernels are tested\n"
              f"      against): no fused backend has a measured win over it for {args.dtype} inference on this\n"
              f"      {device.type}, so expect a speed-up of about 1.0x. `mixer-fast info` shows the table of\n"
              f"      measured wins and why each backend is or is not available; --backend forces one.")

    torch.manual_seed(0)
    model = _build_model(args.model, use_timm).to(device=device, dtype=dtype)
    fused = convert(copy.deepcopy(model), backend=backend, strict=True)
    images = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    runs = [("eager (unconverted)", model), (f"mixer_fast [{chosen}]", fused)]
    if args.compile:
        runs.append(("torch.compile (unconverted)", torch.compile(model)))
    progress = Progress(total=args.iters * len(runs) + 1)
    rows = []
    with torch.inference_mode():
        expected = model(images).float()
        progress.step("reference logits")
        for label, m in runs:
            logits = m(images).float()
            err = (logits - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
            ms = _time_ms(lambda m=m: m(images), args.iters, sync, progress, label)
            rows.append((label, err, ms))

    base = rows[0][2]
    print(f"\n{'run':<30} {'max|err| / max|ref|':>20} {'ms/batch':>10} {'speed-up':>9}")
    for label, err, ms in rows:
        print(f"{label:<30} {err:>20.2e} {ms:>10.1f} {base / ms:>8.2f}x")
    worst = max(err for _, err, _ in rows[:2])
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    if worst > limit:
        print(f"FAIL: mixer_fast logits differ from the unconverted model by {worst:.2e} (limit {limit:.0e})")
        return 1
    print(f"OK: mixer_fast logits match the unconverted model (relative error {worst:.1e} <= {limit:.0e}).")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json
    import subprocess

    if os.environ.get("TRITON_INTERPRET") == "1":
        # Ahead-of-time compilation needs triton in compiled mode, fixed at its first import: re-run clean.
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "mixer_fast", *sys.argv[1:]] if args.argv is None
                               else [sys.executable, "-m", "mixer_fast", *args.argv], env=env)
    try:
        from .kernels.triton import aot
    except ImportError as e:
        print(f"mixer-fast report needs triton: {e}", file=sys.stderr)
        return 1
    rows = aot.report(args.arch, args.dtype, jobs=args.jobs)
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=1))
        return 0
    print(f"Static report: every Triton kernel variant and GPU config compiled ahead of time for {args.arch} "
          f"({args.dtype}) with ptxas {', '.join(sorted({r.ptxas for r in rows}))}; no GPU used.")
    print(f"{'kernel':<28} {'config':<32} {'regs':>5} {'spills':>7} {'smem':>8} {'wgmma':>6} {'hazards':>8}")
    for r in rows:
        print(f"{r.kernel:<28} {r.config:<32} {r.registers:>5} {r.spills:>7} {r.shared_bytes:>8} "
              f"{('yes' if r.wgmma else 'no') if r.has_dot else '-':>6} {r.wgmma_descriptor_hazards:>8}")
    spilling = sum(r.spills > 0 for r in rows)
    print(f"{len(rows)} variants, {spilling} with spills, "
          f"{sum(r.has_dot and not r.wgmma for r in rows)} dot kernels without wgmma, "
          f"{sum(r.wgmma_descriptor_hazards > 0 for r in rows)} with wgmma descriptor hazards")
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    import datetime

    import torch

    from .profiler import roofline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch or (256 if device.type == "cuda" else 8)
    if args.backend:
        backends = ["reference", *[b for b in args.backend.split(",") if b != "reference"]]
    else:  # the reference and every fused backend that serves this device
        backends = ["reference"] + [s.name for s in dispatch.REGISTRY if s.framework == "torch"
                                    and s.name != "reference" and device.type in s.devices
                                    and s.name in dispatch.available_backends("torch")]
    result = roofline.measure(args.config, batch, dtype, backends, device)
    print(roofline.table(result))
    roofline.plot(result, args.out)
    json_path = os.path.splitext(args.out)[0] + ".json"
    roofline.save_json(result, json_path, {"date": datetime.date.today().isoformat(), "versions": _versions()})
    print(f"wrote {args.out} and {json_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixer-fast", description="Fused MLP-Mixer / ResMLP mixing core.")
    parser.add_argument("--version", action="version", version=f"mixer_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print every backend and whether it loaded (and why not)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="convert a Mixer-B/16, check its logits and time it against eager")
    demo.add_argument("--model", default="mixer_b16", help="named config (mixer_b16, resmlp_12, ...)")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--iters", type=int, default=3, help="timed iterations per run (best is reported)")
    demo.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if there is one)")
    demo.add_argument("--backend", default=None, help="force a backend (default: automatic)")
    demo.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile run")
    demo.set_defaults(func=cmd_demo)
    report = sub.add_parser("report", help="compile every Triton kernel and config ahead of time (no GPU needed) "
                                           "and print registers, spills, shared memory, wgmma use")
    report.add_argument("--arch", choices=("sm_90a", "sm_80"), default="sm_90a")
    report.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    report.add_argument("--format", choices=("table", "json"), default="table")
    report.add_argument("--jobs", type=_positive_int, default=_report_jobs(),
                        help=f"compiles at once, one process each (default: the usable CPUs, at most "
                             f"{MAX_REPORT_JOBS})")
    report.set_defaults(func=cmd_report, argv=None)
    roof = sub.add_parser("roofline", help="measure the device's ceilings, time token and channel mixing, "
                                           "and write a roofline PNG + JSON")
    roof.add_argument("--config", default="mixer_b16", help="named config (mixer_b16, resmlp_12, ...)")
    roof.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 on a CPU")
    roof.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                      help="default: bf16 on a GPU, fp32 on a CPU")
    roof.add_argument("--backend", default=None, help="comma-separated backends besides the reference "
                                                      "(default: every fused one that serves the device)")
    roof.add_argument("--device", default=None)
    roof.add_argument("--out", default="roofline.png")
    roof.set_defaults(func=cmd_roofline)
    from . import checkpoint

    conv = sub.add_parser("convert-checkpoint", help="convert Mixer / ResMLP checkpoints between Flax .npz "
                                                     "(vision_transformer), timm and deit layouts")
    checkpoint.add_cli_arguments(conv)
    conv.set_defaults(func=checkpoint.cmd_convert_checkpoint)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is cmd_report and argv is not None:
        args.argv = list(argv)
    if args.command is None:
        parser.print_help()
        return 2
    batch = getattr(args, "batch", None)
    if (batch is not None and batch < 1) or getattr(args, "iters", 1) < 1:
        parser.error("--batch and --iters must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
