"""Stage ``register``: the trained model as an MLflow pyfunc version, aliased ``challenger``, promoted to
``champion`` when its evaluation beats the current champion by the rule in params; the decision and a model
card (data, params, metrics, commit) are recorded on the version."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cs2fusion.checkpoint import read_meta
from cs2fusion.config import Params, to_dict
from cs2fusion.evaluation import comparison_table, leaderboards, leaderboards_markdown
from cs2fusion.io import InputError, write_text
from cs2fusion.metrics import MAIN_METRICS, METRICS_VERSION
from pipeline.common import clean_errors, parser, setup

log = logging.getLogger("pipeline.register")


def model_card(params: Params, meta: dict, evaluation: dict) -> str:
    """Markdown model card: what was trained on what, how, with which results."""
    train = to_dict(params.train)
    return "\n".join([
        f"# {params.register.model_name}: CS2Fusion backbone",
        "",
        "Infrared + visible image fusion (Wang et al., Information Fusion 102, 2024), trained by cs2fusion.",
        "Input: IR (grey) and visible (grey or RGB) uint8 arrays of any size; output: fused uint8, colour from the",
        "visible image's Cb/Cr (BT.601 full range).",
        "",
        f"- training data: shard index sha256 `{meta.get('shards_sha256')}` (sets {', '.join(params.shard.train)})",
        f"- trained: {meta.get('epoch')} epochs, {meta.get('step')} steps"
        + (f" from the nets of `{params.train.init_from}`" if params.train.init_from else "")
        + f" ({meta.get('selection')}); MLflow run `{meta.get('mlflow_run_id')}`",
        f"- code: git commit `{meta.get('git_commit')}`",
        f"- params: `{json.dumps(train, sort_keys=True)}`",
        "",
        "## Evaluation (means; the field's reference metric conventions)",
        "",
        comparison_table(evaluation["sets"], MAIN_METRICS),
        *(["## Leaderboards (the baselines not ranked)", "", leaderboards_markdown(boards, evaluation["sets"])]
          if (boards := leaderboards(evaluation["sets"])) else []),
    ])


def _read_evaluation(path: Path) -> dict:
    """The evaluate stage's JSON, checked for what the gate needs (primary set, our means, metrics version)."""
    try:
        evaluation = json.loads(path.read_text())
        evaluation["sets"][evaluation["primary_set"]]["ours"]
    except FileNotFoundError:
        raise InputError(f"{path}: no such evaluation (run the evaluate stage)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not an evaluate-stage result ({err!r})") from None
    if evaluation.get("metrics_version") != METRICS_VERSION:
        raise InputError(f"{path}: metrics version {evaluation.get('metrics_version')!r}, this code computes "
                         f"{METRICS_VERSION!r}; rerun the evaluate stage")
    return evaluation


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from the train stage")
    p.add_argument("--evaluation", type=Path, required=True, help="metrics JSON of the evaluate stage")
    p.add_argument("--out", type=Path, required=True, help="registration record (JSON)")
    args = p.parse_args()
    params = setup(args)
    meta = read_meta(args.model)
    if not meta.get("mlflow_run_id"):
        raise InputError(f"{args.model}: no MLflow run id in its metadata; register models from the train stage")
    evaluation = _read_evaluation(args.evaluation)
    ours = evaluation["sets"][evaluation["primary_set"]]["ours"]

    from pipeline.mlflow_adapter import artifact_location, model_run, tracking_uri
    from pipeline.registry import register

    rp = params.register
    tracker = model_run(tracking_uri(params.tracking, Path.cwd()), meta["mlflow_run_id"],
                        params.train.tracking.experiment, artifact_location(params.tracking, Path.cwd()), "register")
    decision = register(
        tracker, args.model, name=rp.model_name, evaluation={m: ours[m] for m in MAIN_METRICS if m in ours},
        judged_on={"set": evaluation["primary_set"], "metrics": evaluation["metrics_version"]},
        gate_metrics=list(rp.gate_metrics), min_wins=rp.min_wins, card=model_card(params, meta, evaluation),
        tags={k: str(meta.get(k)) for k in ("git_commit", "shards_sha256", "mlflow_run_id", "epoch", "step")},
    )
    write_text(args.out, json.dumps({**decision, "model_name": rp.model_name, "run_id": tracker.run_id},
                                    indent=2, sort_keys=True) + "\n")
    verdict = "promoted to champion" if decision["promoted"] else "kept as challenger"
    log.info("%s version %s %s (wins: %s)", rp.model_name, decision["version"], verdict, decision["wins"])


if __name__ == "__main__":
    main()
