"""A field survey: kfx's exact engine on many timm architectures beyond the tested zoo, each map
checked cell by cell against brute-force occlusion (kfx.NaiveEngine: the model on occluded copies).

The zoo test (tests/timm_zoo.py) pins 20 families with their expected dense nodes; this survey
asks the user's question for many more ("does kfx work on my model, and is it right?") without
pinning anything: per model, one of

  exact     compiled, and the whole map equals brute force (float64, max abs difference <= 1e-9);
  refused   kfx.compile or the engine raised a kfx.KfxError (kfx says why; never a wrong map);
  MISMATCH  the map differs from brute force: a silently wrong map, the worst outcome;
  ERROR     any other exception: a bug (kfx should have refused with a KfxError).

Random weights (timm ``pretrained=False``, 10 classes) in float64, random batch-norm statistics
(so normalisation is not the identity), a random image, the default fill 0.0. The image side is
the smallest of 64, 96, 128, 224, 256 the eager model accepts; patch 16, stride 8 at 64 px and
16 above. Each model runs in its own process with a time limit, so one hang or crash costs one
row. Results: JSON and a Markdown table in benchmarks/results/ with machine, commit and command.
A survey, not a test: it never fails (about 15 min here for the default list).

    python benchmarks/timm_field.py
    python benchmarks/timm_field.py --models skresnet18 halonet26t --tag timm_field_two
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings

import torch
from compare import machine, save_results  # benchmarks/ is on sys.path

import kfx

# One or two members of each timm family the zoo test does not pin, chosen for the operators they
# bring: attention blocks (global), selective kernels, halo/lambda/bottleneck attention, Res2Net
# splits, re-parameterisable blocks, CondConv, poolformer/metaformer mixers, focal modulation.
MODELS = (
    "resnet10t", "resnet26d", "resnet50s", "resnetaa34d", "resnetrs50", "seresnext26d_32x4d",
    "skresnet18", "ecaresnet26t", "gcresnet33ts", "resnet33ts", "sebotnet33ts_256", "halonet26t",
    "lambda_resnet26t", "botnet26t_256", "resnext26ts", "res2net50_14w_8s", "res2next50", "gernet_s",
    "repvgg_a0", "mobileone_s0", "fbnetc_100", "fbnetv3_b", "mixnet_s", "mnasnet_small", "spnasnet_100",
    "semnasnet_050", "tinynet_e", "efficientnetv2_rw_t", "hardcorenas_a", "densenet121",
    "densenetblur121d", "dla34", "dla46x_c", "ese_vovnet19b_dw", "selecsls42b", "hrnet_w18_small_v2",
    "cs3darknet_s", "cspdarknet53", "darknetaa53", "cspresnext50", "xception41", "xception41p",
    "legacy_xception", "inception_v3", "inception_v4", "inception_resnet_v2", "dpn48b", "regnety_002",
    "regnetz_b16", "rexnetr_100", "poolformer_s12", "poolformerv2_s12", "convformer_s18",
    "mambaout_femto", "edgenext_xx_small", "fastvit_t8", "repghostnet_050", "ghostnetv2_100",
    "mobilenetv4_conv_small", "mobilenetv2_035", "mobilenetv3_rw", "hgnet_tiny", "hgnetv2_b0",
    "repvit_m0_9", "starnet_s1", "rdnet_tiny", "fasternet_t0", "convnext_femto", "nf_regnet_b0",
    "eca_nfnet_l0", "efficientnet_cc_b0_4e", "efficientnet_es", "tf_mixnet_s", "inception_next_atto",
    "mobilevit_xxs", "levit_128s", "efficientvit_m0", "coatnet_0_rw_224", "maxvit_nano_rw_256",
    "focalnet_tiny_srf", "convmixer_768_32", "vit_tiny_patch16_224", "resmlp_12_224",
    "efficientformer_l1", "shvit_s1",
)  # fmt: skip
SIDES = (64, 96, 128, 224, 256)
TOLERANCE = 1e-9


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def smallest_side(model: torch.nn.Module) -> int | None:
    for side in SIDES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side, dtype=torch.float64))
            return side
        except Exception:  # noqa: BLE001 - the model's own limit on its input size; try the next
            continue
    return None


def survey_one(name: str) -> dict:
    """One model's row (runs in the child process)."""
    warnings.filterwarnings("ignore")
    row: dict = {"model": name}
    model = build(name)
    side = smallest_side(model)
    if side is None:
        return {**row, "status": "skipped", "why": f"the eager model takes none of the sides {SIDES}"}
    patch = kfx.Patch(16, stride=8 if side == 64 else 16)
    image = torch.randn(3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    row.update(side=side, stride=patch.stride[0], positions=math.prod(patch.grid_shape((side, side))))
    try:
        started = time.perf_counter()
        engine = kfx.compile(model, (3, side, side), patch)
        row["compile_s"] = round(time.perf_counter() - started, 2)
        row["dense_nodes"] = len(engine.dense_nodes)
        row["plan"] = "full inference" if engine.compiled.plan.full_inference else "incremental"
        target = 3
        exact = engine(image, target).values
        brute = kfx.NaiveEngine(model, (3, side, side), patch)(image, target).values
    except kfx.KfxError as exc:
        return {**row, "status": "refused", "why": f"{type(exc).__name__}: {exc}"[:300]}
    except Exception as exc:  # noqa: BLE001 - the survey records it: a bug to fix
        return {**row, "status": "ERROR", "why": f"{type(exc).__name__}: {exc}"[:300]}
    difference = (exact - brute).abs().max().item()
    row["max_abs_difference"] = difference
    row["status"] = "exact" if difference <= TOLERANCE else "MISMATCH"
    return row


def run_child(name: str, threads: int, limit: float) -> dict:
    command = [sys.executable, __file__, "--child", name, "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "ERROR", "why": f"no result within {limit:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (done.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
    return {
        "model": name,
        "status": "ERROR",
        "why": f"the process ended ({done.returncode}): {tail[0][:250]}",
    }


def markdown(rows: list[dict], info: dict, command: str) -> str:
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("exact", "refused", "MISMATCH", "ERROR", "skipped")
    }
    lines = [
        "# Field survey: kfx exact on timm architectures, against brute-force occlusion",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `{command}`.",
        "",
        "Random weights and batch-norm statistics, float64, random image, fill 0.0; patch 16, stride 8 at "
        "64 px and 16 above (the smallest side of 64/96/128/224/256 the eager model accepts). The whole "
        f"map is compared with kfx.NaiveEngine (the model on occluded copies); exact means max abs "
        f"difference <= {TOLERANCE:g}. Dense nodes: where the engine stops being incremental (global "
        "context, or a changed box covering the map); plan: what the engine runs.",
        "",
        "Summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} models.",
        "",
        "| model | side | stride | positions | status | max abs difference | dense nodes | plan | compile s | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['max_abs_difference']:.1e}" if "max_abs_difference" in r else "-"
        lines.append(
            f"| {r['model']} | {r.get('side', '-')} | {r.get('stride', '-')} | {r.get('positions', '-')} | "
            f"{r['status']} | {diff} | {r.get('dense_nodes', '-')} | {r.get('plan', '-')} | "
            f"{r.get('compile_s', '-')} | {r.get('why', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--tag", default="timm_field")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print("ROW " + json.dumps(survey_one(args.child)), flush=True)
        return []
    rows, info = [], machine()  # the commit the survey starts at (children import kfx as it is then)
    for name in args.models:
        rows.append(run_child(name, args.threads, args.limit))
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/timm_field.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save_results(
        args.tag,
        {"machine": info, "command": command.strip(), "rows": rows},
        markdown(rows, info, command.strip()),
    )
    return rows


if __name__ == "__main__":
    main()
