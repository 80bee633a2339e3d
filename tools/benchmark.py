#!/usr/bin/env python
"""Side-by-side benchmark of ACM: this package's module, the literal equations, the floor.

Part 1, one module at the ResNet-50 stage shapes of an 800x1216 input (batch 2), measured
interleaved in one run on one device:
  (a) ``acm_d2.ACM`` (the fused autograd Function),
  (b) ``acm_d2.ReferenceACM`` (the paper's equations written literally, same weights),
  (c) one elementwise multiply pass over X (``X * s``): the floor;
forward (inference) and forward+backward time (min and median over the repeats, and ratios),
and the bytes each saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
each distinct storage once), also as a ratio to the size of X.

Part 2, the whole Mask R-CNN R-50-FPN built from the repo configs with and without ACM (the
ACM model gets the plain model's weights for every shared parameter, so both differ only by
the ACM modules), interleaved: backbone inference latency, full training step time (forward,
losses, backward, SGD step with lr 0 on a batch with a few random boxes), parameters and
backbone FLOPs (fvcore).

    python tools/benchmark.py                  # everything, on CUDA if there is one
    python tools/benchmark.py --quick          # tiny shapes, 1 repeat, no whole model
    python tools/benchmark.py --json out.json  # also write the results as JSON
"""
import argparse
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acm_d2 import ACM, ReferenceACM, add_acm_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_SHAPES = {
    "res2": (2, 256, 200, 304),
    "res3": (2, 512, 100, 152),
    "res4": (2, 1024, 50, 76),
    "res5": (2, 2048, 25, 38),
}
QUICK_SHAPES = {"tiny3": (2, 64, 12, 19), "tiny5": (1, 128, 7, 9)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per module case (after 1 warm-up)")
    parser.add_argument(
        "--shapes",
        default="res2,res3,res4,res5",
        help="comma-separated stage names (res2..res5) or NxCxHxW shapes for the module benchmark",
    )
    parser.add_argument("--groups", type=int, default=32, help="ACM groups G")
    parser.add_argument("--model-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="whole-model input size (default 512 512 on CPU, 800 1216 on CUDA)")
    parser.add_argument("--model-batch", type=int, default=None, help="whole-model batch (default 1 on CPU, 2 on CUDA)")
    parser.add_argument("--model-repeats", type=int, default=5, help="timed repeats per whole-model case")
    parser.add_argument(
        "--rois-per-image",
        type=int,
        default=32,
        help="training step: every proposal is foreground and each image samples exactly this many ROIs "
        "for the box and mask heads, so that both models do the same work there (0: the config's "
        "sampling, whose foreground count depends on the random weights)",
    )
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model benchmark")
    parser.add_argument("--no-module", action="store_true", help="skip the module benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat, no whole model (a smoke test)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = ",".join(QUICK_SHAPES)
        args.repeats = 1
        args.no_model = True
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_shapes(spec: str):
    shapes = {}
    for item in spec.split(","):
        item = item.strip()
        if item in STAGE_SHAPES:
            shapes[item] = STAGE_SHAPES[item]
        elif item in QUICK_SHAPES:
            shapes[item] = QUICK_SHAPES[item]
        else:
            dims = tuple(int(v) for v in item.lower().split("x"))
            if len(dims) != 4:
                raise SystemExit(f"--shapes: {item!r} is neither a stage name nor NxCxHxW")
            shapes[item] = dims
    return shapes


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def run_interleaved(cases: dict, repeats: int, device, warmup: int = 1) -> dict:
    """Time every case ``repeats`` times, cycling through the cases (after ``warmup`` rounds)."""
    times = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            elapsed = timed(fn, device)
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: {"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts), "all_ms": [1e3 * t for t in ts]}
            for name, ts in times.items()}


def saved_bytes(fn) -> int:
    """Bytes saved for backward by the graph that ``fn`` builds (each distinct storage once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = fn()
    del outputs
    return sum(storages.values())


def reference_like(module: ACM) -> ReferenceACM:
    """A ReferenceACM with the weights of ``module`` (K = add_mod, Q = sub_mod, P = mul_mod)."""
    ref = ReferenceACM(module.channels, module.groups).to(module.kq_logits.weight.device)
    state = {
        "add_mod.map_gen.0.weight": module.kq_logits.weight[0::2],
        "add_mod.map_gen.0.bias": module.kq_logits.bias[0::2],
        "sub_mod.map_gen.0.weight": module.kq_logits.weight[1::2],
        "sub_mod.map_gen.0.bias": module.kq_logits.bias[1::2],
        "mul_mod.feature_gen.0.weight": module.channel_gate[0].weight,
        "mul_mod.feature_gen.0.bias": module.channel_gate[0].bias,
        "mul_mod.feature_gen.2.weight": module.channel_gate[2].weight,
        "mul_mod.feature_gen.2.bias": module.channel_gate[2].bias,
    }
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return ref


def bench_module(name, shape, groups, repeats, device) -> dict:
    n, c, h, w = shape
    torch.manual_seed(0)
    fast = ACM(c, groups=groups).to(device).train()
    fast.record_orthogonality = True
    ref = reference_like(fast).train()
    x = torch.randn(shape, device=device)
    x_grad = x.clone().requires_grad_(True)
    upstream = torch.randn(shape, device=device)
    scale = torch.rand(n, c, 1, 1, device=device)
    scale_grad = scale.clone().requires_grad_(True)

    def fast_forward():
        with torch.no_grad():
            return fast(x)

    def ref_forward():
        with torch.no_grad():
            return ref(x)[0]

    def floor_forward():
        return x * scale

    def fast_train():
        y = fast(x_grad)
        torch.autograd.backward([y, fast.last_orthogonality], [upstream, torch.ones_like(fast.last_orthogonality)])
        fast.last_orthogonality = None

    def ref_train():
        y, orthogonality = ref(x_grad)
        torch.autograd.backward([y, orthogonality], [upstream, torch.ones_like(orthogonality)])

    def floor_train():
        (x_grad * scale_grad).backward(upstream)

    def clear_grads():
        for tensor in [x_grad, scale_grad, *fast.parameters(), *ref.parameters()]:
            tensor.grad = None

    cases = {
        "floor_fwd": floor_forward,
        "acm_fwd": fast_forward,
        "ref_fwd": ref_forward,
        "floor_fwdbwd": lambda: (floor_train(), clear_grads()),
        "acm_fwdbwd": lambda: (fast_train(), clear_grads()),
        "ref_fwdbwd": lambda: (ref_train(), clear_grads()),
    }
    times = run_interleaved(cases, repeats, device)
    x_bytes = x.numel() * x.element_size()
    acm_saved = saved_bytes(lambda: fast(x_grad))
    fast.last_orthogonality = None
    ref_saved = saved_bytes(lambda: ref(x_grad))
    floor = times["floor_fwd"]["min_ms"]
    result = {
        "name": name,
        "shape": list(shape),
        "groups": groups,
        "x_bytes": x_bytes,
        "times": times,
        "acm_saved_bytes": acm_saved,
        "ref_saved_bytes": ref_saved,
        "acm_saved_ratio": acm_saved / x_bytes,
        "ref_saved_ratio": ref_saved / x_bytes,
        "acm_fwd_over_floor": times["acm_fwd"]["min_ms"] / floor,
        "ref_fwd_over_floor": times["ref_fwd"]["min_ms"] / floor,
        "acm_fwdbwd_over_floor": times["acm_fwdbwd"]["min_ms"] / floor,
        "ref_fwdbwd_over_floor": times["ref_fwdbwd"]["min_ms"] / floor,
        "ref_over_acm_fwd": times["ref_fwd"]["min_ms"] / times["acm_fwd"]["min_ms"],
        "ref_over_acm_fwdbwd": times["ref_fwdbwd"]["min_ms"] / times["acm_fwdbwd"]["min_ms"],
        "ref_over_acm_fwdbwd_median": times["ref_fwdbwd"]["median_ms"] / times["acm_fwdbwd"]["median_ms"],
    }
    del fast, ref, x, x_grad, upstream
    gc.collect()
    return result


def print_module_results(results):
    print("\n== One ACM module: (a) acm_d2.ACM, (b) literal ReferenceACM, (c) floor = one X * s pass ==")
    print("times in ms as min / median; ratios from the minima")
    header = (
        f"{'shape':>22} | {'floor fwd':>13} | {'(a) fwd':>13} {'a/fl':>5} | {'(b) fwd':>15} {'b/fl':>5} | "
        f"{'floor f+b':>13} | {'(a) f+b':>13} {'a/fl':>5} | {'(b) f+b':>15} {'b/fl':>5} | {'b/a f+b':>7} | "
        f"{'saved a/X':>9} {'saved b/X':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        t = r["times"]

        def mm(key):
            return f"{t[key]['min_ms']:.1f}/{t[key]['median_ms']:.1f}"

        shape = "x".join(str(v) for v in r["shape"])
        print(
            f"{r['name'] + ' ' + shape:>22} | {mm('floor_fwd'):>13} | {mm('acm_fwd'):>13} {r['acm_fwd_over_floor']:5.2f} | "
            f"{mm('ref_fwd'):>15} {r['ref_fwd_over_floor']:5.2f} | {mm('floor_fwdbwd'):>13} | "
            f"{mm('acm_fwdbwd'):>13} {r['acm_fwdbwd_over_floor']:5.2f} | {mm('ref_fwdbwd'):>15} "
            f"{r['ref_fwdbwd_over_floor']:5.2f} | {r['ref_over_acm_fwdbwd']:7.2f} | "
            f"{r['acm_saved_ratio']:9.3f} {r['ref_saved_ratio']:9.3f}"
        )
    print("saved a/X, b/X: bytes saved for backward (each storage once) over the bytes of X")


def build_models(device, rois_per_image, repeats_seed=0):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    models = {}
    for key, config in (("plain", "mask_rcnn_R_50_FPN_1x.yaml"), ("acm", "mask_rcnn_R_50_FPN_1x_acm.yaml")):
        cfg = get_cfg()
        add_acm_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", "COCO-InstanceSegmentation", config))
        cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)])
        if rois_per_image > 0:
            # Every proposal counts as foreground (label 1 below and above the IoU threshold)
            # and each image samples exactly this many, so both models run their box and mask
            # heads on the same number of ROIs (with random weights the number of foreground
            # proposals, hence the mask head's work, would differ between the models).
            cfg.merge_from_list(
                [
                    "MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.5],
                    "MODEL.ROI_HEADS.IOU_LABELS", [1, 1],
                    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", rois_per_image,
                    "MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.0,
                    # A fixed number of samples per bin: with the default 0 (adaptive) the cost of
                    # ROIAlign grows with the size of each proposal, which differs between models.
                    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2,
                    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2,
                ]
            )
        torch.manual_seed(repeats_seed)
        models[key] = build_model(cfg)
    if rois_per_image > 0:
        # Zero output convs of the RPN head: every proposal is an anchor, the same in both
        # models (with random weights the proposals, hence the heads' work, would differ).
        head = models["plain"].proposal_generator.rpn_head
        with torch.no_grad():
            for conv in (head.objectness_logits, head.anchor_deltas):
                conv.weight.zero_()
                conv.bias.zero_()
    # The same weights for every shared parameter: the models differ only by the ACM modules.
    missing, unexpected = models["acm"].load_state_dict(models["plain"].state_dict(), strict=False)
    assert not unexpected and all(".acm." in k for k in missing), (missing, unexpected)
    return models


def random_batch(batch, height, width, device, boxes_per_image=3, seed=0):
    from detectron2.structures import BitMasks, Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8).float()
        xy = torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        wh = (0.2 + 0.2 * torch.rand(boxes_per_image, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes[0] = torch.tensor([0.0, 0.0, width, height])  # a whole-image box
        masks = torch.zeros(boxes_per_image, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (boxes_per_image,), generator=generator)
        instances.gt_masks = BitMasks(masks)
        inputs.append({"image": image.to(device), "instances": instances.to(device), "height": height, "width": width})
    return inputs


def bench_model(device, size, batch, repeats, rois_per_image) -> dict:
    from detectron2.utils.events import EventStorage
    from fvcore.nn import FlopCountAnalysis

    from acm_d2.modeling.flops import add_acm_flop_handles

    models = build_models(device, rois_per_image)
    height, width = size
    inputs = random_batch(batch, height, width, device)
    result = {"input": [batch, 3, height, width], "rois_per_image": rois_per_image}
    with torch.no_grad():
        images = models["plain"].preprocess_image(inputs).tensor  # normalized, padded to 32
    result["backbone_input"] = list(images.shape)
    for key, model in models.items():
        result[f"{key}_params"] = sum(p.numel() for p in model.parameters())
        result[f"{key}_backbone_params"] = sum(p.numel() for p in model.backbone.parameters())
        model.eval()
        with torch.no_grad():
            flops = add_acm_flop_handles(FlopCountAnalysis(model.backbone, (images,)))
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            result[f"{key}_backbone_gflops"] = flops.total() / 1e9
            result[f"{key}_backbone_unsupported_ops"] = dict(flops.unsupported_ops())

    def backbone_inference(model):
        def run():
            with torch.no_grad():
                model.backbone(images)

        return run

    optimizers = {key: torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9) for key, model in models.items()}

    def train_step(key):
        model, optimizer = models[key], optimizers[key]

        def run():
            torch.manual_seed(0)  # the same RPN / ROI sampling draws for both models
            losses = model(inputs)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

        return run

    print("  built both models, counted FLOPs; timing backbone inference", flush=True)
    for model in models.values():
        model.eval()
    # A control: the plain backbone with one elementwise multiply pass (X * s, the floor of any
    # module there) at each of the 13 places where the ACM model has an ACM.
    floor = copy.deepcopy(models["plain"]).eval()
    for block_name in models["acm"].backbone.bottom_up.context_modules_by_block:
        stage, index = block_name.split(".")
        conv3 = getattr(floor.backbone.bottom_up, stage)[int(index)].conv3
        scale = torch.rand(1, conv3.out_channels, 1, 1, device=device)
        conv3.register_forward_hook(lambda module, args, output, scale=scale: output * scale)
    inference = run_interleaved(
        {
            "plain": backbone_inference(models["plain"]),
            "floor": backbone_inference(floor),
            "acm": backbone_inference(models["acm"]),
        },
        repeats * 2,
        device,
        warmup=2,
    )
    del floor
    for model in models.values():
        model.train()
    # In-situ share: the time spent inside the ACM modules during the ACM backbone's inference,
    # over that inference's time, measured within the same runs (less exposed to the noise of
    # a shared machine than the difference of two separately timed models).
    modules = [m for m in models["acm"].modules() if isinstance(m, ACM)]
    inside = [0.0]

    def before(module, args):
        synchronize(device)
        module._bench_start = time.perf_counter()

    def after(module, args, output):
        synchronize(device)
        inside[0] += time.perf_counter() - module._bench_start

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    shares, module_ms = [], []
    for _ in range(repeats * 2):
        inside[0] = 0.0
        total = timed(backbone_inference(models["acm"]), device)
        shares.append(inside[0] / total)
        module_ms.append(1e3 * inside[0])
    for handle in handles:
        handle.remove()
    result["acm_modules_inference_ms"] = {"min_ms": min(module_ms), "median_ms": statistics.median(module_ms)}
    result["acm_share_of_backbone_inference"] = {"min": min(shares), "median": statistics.median(shares)}
    print("  timing training steps", flush=True)
    with EventStorage(0):  # the losses log to it
        with torch.no_grad():
            result["acm_loss_keys"] = sorted(models["acm"](inputs).keys())
        training = run_interleaved({"plain": train_step("plain"), "acm": train_step("acm")}, repeats, device, warmup=1)
    result["backbone_inference"] = inference
    result["train_step"] = training
    for kind, times in (("backbone_inference", inference), ("train_step", training)):
        for stat in ("min_ms", "median_ms"):
            result[f"{kind}_acm_over_plain_{stat[:-3]}"] = times["acm"][stat] / times["plain"][stat]
    for stat in ("min_ms", "median_ms"):
        result[f"backbone_inference_floor_over_plain_{stat[:-3]}"] = inference["floor"][stat] / inference["plain"][stat]
    del models, optimizers
    gc.collect()
    return result


def print_model_results(r):
    print(f"\n== Mask R-CNN R-50-FPN, without and with ACM (13 modules, groups 32), input {r['input']} ==")
    print(f"{'':28} {'plain':>14} {'ACM':>14} {'ACM / plain':>12}")
    for kind, label in (("backbone_inference", "backbone inference ms"), ("train_step", "training step ms")):
        t = r[kind]
        for stat in ("min", "median"):
            print(
                f"{label + ' (' + stat + ')':28} {t['plain'][stat + '_ms']:14.1f} {t['acm'][stat + '_ms']:14.1f} "
                f"{r[kind + '_acm_over_plain_' + stat]:12.4f}"
            )
    t = r["backbone_inference"]
    for stat in ("min", "median"):
        print(
            f"{'control: 13 X*s passes (' + stat + ')':28} {t['plain'][stat + '_ms']:14.1f} {t['floor'][stat + '_ms']:14.1f} "
            f"{r['backbone_inference_floor_over_plain_' + stat]:12.4f}  (plain backbone + the floor at each ACM place)"
        )
    share = r["acm_share_of_backbone_inference"]
    print(
        f"{'inside the 13 ACM modules':28} {'':14} {r['acm_modules_inference_ms']['min_ms']:14.1f} ms min, "
        f"{r['acm_modules_inference_ms']['median_ms']:.1f} ms median of backbone inference: "
        f"{100 * share['min']:.2f}% (min) / {100 * share['median']:.2f}% (median) of it, i.e. "
        f"+{100 * share['min'] / (1 - share['min']):.2f}% / +{100 * share['median'] / (1 - share['median']):.2f}% "
        f"over the backbone without them"
    )
    print(f"{'parameters (model)':28} {r['plain_params']:14,d} {r['acm_params']:14,d} {r['acm_params'] / r['plain_params']:12.4f}")
    print(
        f"{'parameters (backbone)':28} {r['plain_backbone_params']:14,d} {r['acm_backbone_params']:14,d} "
        f"{r['acm_backbone_params'] / r['plain_backbone_params']:12.4f}"
    )
    print(
        f"{'backbone GFLOPs (fvcore)':28} {r['plain_backbone_gflops']:14.2f} {r['acm_backbone_gflops']:14.2f} "
        f"{r['acm_backbone_gflops'] / r['plain_backbone_gflops']:12.4f}"
    )
    print(f"backbone input {r['backbone_input']}; ACM loss keys: {r['acm_loss_keys']}")
    if r["rois_per_image"] > 0:
        print(f"training step: {r['rois_per_image']} foreground ROIs per image in both models")
    if r["acm_backbone_unsupported_ops"]:
        print(f"ops fvcore does not count (ACM model): {r['acm_backbone_unsupported_ops']}")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable), "tools/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
    }
    print(
        f"acm-d2 benchmark on {info['device']} ({info['device_name']}), {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}"
    )
    results = {"info": info}
    if not args.no_module:
        module_results = []
        for name, shape in parse_shapes(args.shapes).items():
            module_results.append(bench_module(name, shape, args.groups, args.repeats, device))
            print(f"  measured {name} {shape}", flush=True)
        results["module"] = module_results
        print_module_results(module_results)
    if not args.no_model:
        size = tuple(args.model_size) if args.model_size else ((512, 512) if device.type == "cpu" else (800, 1216))
        batch = args.model_batch or (1 if device.type == "cpu" else 2)
        results["model"] = bench_model(device, size, batch, args.model_repeats, args.rois_per_image)
        print_model_results(results["model"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
