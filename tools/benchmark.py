#!/usr/bin/env python
"""Side-by-side benchmark of ACM and its peers (the measuring code is the package acm_d2/benchmarks/).

    python tools/benchmark.py --threads 2 --json bench.json   # everything (docs/benchmark.md)
    python tools/benchmark.py --device cuda --json bench.json # on a GPU
    python tools/benchmark.py --quick                         # a smoke test, tiny shapes
    python tools/benchmark.py --autocast-errors --no-module --no-model --no-compile --no-peers \
        --stages res3,res4,res5                               # every module under autocast vs float32

Every figure is a ratio of cases timed interleaved in this run (minima over the repeats).
"""
import argparse
import json
import logging
import os
import platform
import sys

import torch

from acm_d2.benchmarks import model, module, peers
from acm_d2.benchmarks.timing import QUICK_STAGES, STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "COCO-InstanceSegmentation")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per module case (after 1 warm-up)")
    parser.add_argument("--stages", default="res2,res3,res4,res5", help="module shapes: stage names")
    parser.add_argument("--batches", default="1,2", help="module batch sizes")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--model-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--model-batch", type=int, default=2)
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--no-module", action="store_true", help="skip the module benchmark")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model benchmark")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile benchmark")
    parser.add_argument("--no-peers", action="store_true", help="skip SE, GC, CBAM, NL, CC next to ACM")
    parser.add_argument("--peer-batch", type=int, default=2, help="batch of the peer module shapes")
    parser.add_argument("--autocast-errors", action="store_true",
                        help="every module under bfloat16 / float16 autocast against float32 at the --stages shapes")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat, modules only")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.no_model, args.no_compile = 1, True, True
        args.peer_batch = 1
    return args


def print_modules(results):
    print("\n== One ACM (groups %d) vs plain ops, the literal module and the floor (X * s) ==" % results[0]["groups"])
    print("ratios of minimum times; ops/acm and ref/acm > 1: acm faster; cl: channels_last")
    columns = [
        ("infer acm/floor", "acm_over_floor_infer_contiguous"), ("infer ops/acm", "ops_over_acm_infer_contiguous"),
        ("infer ops/acm cl", "ops_over_acm_infer_channels_last"), ("infer cl/contig", "acm_cl_over_contiguous_infer"),
        ("infer ref/acm", "ref_over_acm_infer"), ("train ops/acm", "ops_over_acm_train_contiguous"),
        ("train ops/acm cl", "ops_over_acm_train_channels_last"), ("train cl/contig", "acm_cl_over_contiguous_train"),
        ("train ref/acm", "ref_over_acm_train"),
    ]
    print(f"| {'shape':<20} | " + " | ".join(label for label, _ in columns) + " | saved acm/X |")
    print("|---" * (len(columns) + 2) + "|")
    for r in results:
        shape = r["stage"] + " " + "x".join(map(str, r["shape"]))
        cells = " | ".join(f"{r['ratios'][key]:.2f}".rjust(len(label)) for label, key in columns)
        print(f"| {shape:<20} | {cells} | {r['saved_over_x']['acm']:.3f} |")
    print("\nacm times (ms, min): " + "; ".join(
        f"{r['stage']} b{r['shape'][0]}: infer {r['times']['acm_infer_contiguous']['min_ms']:.1f}, "
        f"train {r['times']['acm_train_contiguous']['min_ms']:.1f}" for r in results))
    if "peak_mib" in results[0]["times"]["acm_train_contiguous"]:
        for r in results:
            t = r["times"]
            print(f"peak MiB {r['stage']} b{r['shape'][0]} train: acm {t['acm_train_contiguous']['peak_mib']:.0f}, "
                  f"ops {t['ops_train_contiguous']['peak_mib']:.0f}, ref {t['ref_train_contiguous']['peak_mib']:.0f}")


def print_model(r):
    print(f"\n== Mask R-CNN R-50-FPN, input {r['input']}, {r['acm_modules']} ACM places: time over the plain model ==")
    print("| | ACM | authors' module | control (X * s) |\n|---|---|---|---|")
    print(f"| backbone inference | {r['inference_acm_over_plain']:.4f} | {r['inference_authors_over_plain']:.4f} | "
          f"{r['inference_control_over_plain']:.4f} |")
    print(f"| training step | {r['training_acm_over_plain']:.4f} | {r['training_authors_over_plain']:.4f} | |")
    print("plain model ms (min): inference %.1f, training %.1f" % (r["inference"]["plain"]["min_ms"], r["training"]["plain"]["min_ms"]))


def print_compiled(r):
    print(f"\n== Backbone inference, input {r['input']}, eager and torch.compile (compile + first calls {r['compile_and_first_call_s']:.0f} s) ==")
    print(f"ACM / plain eager {r['eager_acm_over_plain']:.4f}; ACM / plain compiled {r['compiled_acm_over_plain']:.4f}; "
          f"ACM compiled / eager {r['compiled_over_eager_acm']:.4f}")


def print_peers(modules, scaling, models):
    print("\n== ACM and its peers where their papers put them, batch %d: time over the floor (X * s) ==" % modules[0]["shape"][0])
    print("| stage | module | infer | infer cl | train | train cl | saved / X |\n|---|---|---|---|---|---|---|")
    for r in modules:
        for name in r["saved_over_x"]:
            f = r["over_floor"]
            print(f"| {r['stage']} | {name} | {f[name + '_infer_contiguous']:.2f} | {f[name + '_infer_channels_last']:.2f} | "
                  f"{f[name + '_train_contiguous']:.2f} | {f[name + '_train_channels_last']:.2f} | {r['saved_over_x'][name]:.2f} |")
    if scaling:
        print("\nNL and CC at res4, batch 1: saved for backward (MiB)")
        print("| input | res4 H x W | HW | NL | CC |\n|---|---|---|---|---|")
        for row in scaling:
            print(f"| {row['input'][0]}x{row['input'][1]} | {row['res4'][0]}x{row['res4'][1]} | {row['hw']} | "
                  f"{row['NL_saved_mib']:.0f} | {row['CC_saved_mib']:.0f} |")
    if models:
        print(f"\n== Mask R-CNN R-50-FPN, input {models['input']}: time over the plain model ==")
        print("| module | backbone inference | training step | backbone parameters added |\n|---|---|---|---|")
        for name, r in models["over_plain"].items():
            print(f"| {name} | {r['inference']:.4f} | {r['training']:.4f} | {r['parameters'] / 1e6:.2f} M |")


def print_autocast_errors(rows):
    print("\n== Every module under autocast against float32, the same X ~ N(0, 8^2) and upstream gradient ==")
    print("largest error over the largest float32 magnitude, of Y and of dL/dX")
    print("| precision | stage | module | finite | Y | dL/dX |\n|---|---|---|---|---|---|")
    for e in rows:
        print(f"| {e['precision']} | {e['stage']} | {e['module']} | {'yes' if e['finite'] else 'NO'} | "
              f"{e['output_error']:.1e} | {e['grad_error']:.1e} |")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": " ".join(["python tools/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"acm-d2 benchmark on {info['device']} ({info['device_name']}), {info['torch_threads']} threads, torch {info['torch']}")
    results = {"info": info}
    if not args.no_module:
        stages = QUICK_STAGES if args.quick else {s: STAGES[s] for s in args.stages.split(",")}
        batches = [int(b) for b in args.batches.split(",")]
        results["module"] = module.bench_modules(stages, batches, args.groups, args.repeats, device)
        print_modules(results["module"])
    if not args.no_model:
        results["model"] = model.bench_models(CONFIGS, device, args.model_size, args.model_batch, args.model_repeats)
        print_model(results["model"])
    if not args.no_compile:
        results["compiled"] = model.bench_compiled(CONFIGS, device, args.model_size, args.model_batch, args.model_repeats)
        print_compiled(results["compiled"])
    if not args.no_peers:
        stages = QUICK_STAGES if args.quick else {s: STAGES[s] for s in args.stages.split(",")}
        results["peers"] = peers.bench_peer_modules(stages, args.peer_batch, args.repeats, device)
        results["peer_memory"] = [] if args.quick else peers.attention_memory_scaling(device)
        if not args.no_model:
            results["peer_models"] = peers.bench_peer_models(
                CONFIGS, device, args.model_size, args.model_batch, args.model_repeats)
        print_peers(results["peers"], results["peer_memory"], results.get("peer_models"))
    if args.autocast_errors:
        stages = QUICK_STAGES if args.quick else {s: STAGES[s] for s in args.stages.split(",")}
        results["autocast_errors"] = [row for precision in ("bfloat16", "float16")
                                      for row in peers.precision_errors(stages, args.peer_batch, device, precision)]
        print_autocast_errors(results["autocast_errors"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
