"""The promotion gate on the validation split, in a real MLflow sqlite store.

Each version's run logs its validation predictions the way the ion_model stage does
(``transfer_stage._log_val_predictions``); the gate pairs them crystal by crystal and refuses only
a candidate worse than the champion by more than one paired standard error. The test split is
never read: the ``test_mae`` tags are set to mislead and must change nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from training.registry import (
    NoSuchVersion,
    PromotionRefused,
    by_alias,
    check_gate,
    paired_comparison,
    promote,
)
from voltage_model.naming import CANDIDATE, CHAMPION, VersionInfo

NAME = "electrode-voltage-Mg"
N = 40
RNG = np.random.default_rng(7)
TARGETS = np.round(RNG.uniform(1.0, 4.0, N), 4)
IDS = [f"mp-{1000 + i}" for i in range(N)]
# The champion's absolute errors, in [0.8, 1.2] V (room for the candidates' to stay positive),
# with alternating signs.
CHAMP_ERR = RNG.uniform(0.8, 1.2, N)
SIGNS = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)


def _standard(z: np.ndarray) -> np.ndarray:
    """Mean 0, sample std (ddof=1) 1: a paired difference's mean and SE are then set exactly."""
    return (z - z.mean()) / z.std(ddof=1)


def _candidate_err(mean: float, sd: float, seed: int = 1) -> np.ndarray:
    """Candidate absolute errors whose paired difference to the champion has the given mean and
    standard deviation, so its SE is sd / sqrt(N)."""
    d = mean + sd * _standard(np.random.default_rng(seed).normal(size=N))
    err = CHAMP_ERR + d
    assert (err > 0).all()
    return err


@dataclasses.dataclass
class _ValSplit:
    """What ``_log_val_predictions`` reads of an IonData: the validation ids and targets."""

    ids_: list[str]
    targets_: np.ndarray

    def ids(self, split: str) -> list[str]:
        assert split == "val", "the validation writer must only read the validation split"
        return self.ids_

    def targets(self, split: str) -> np.ndarray:
        assert split == "val", "the validation writer must only read the validation split"
        return self.targets_


Publish = Callable[..., VersionInfo]


@pytest.fixture
def publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Publish]:
    """A fresh sqlite store; ``publish(abs_err, ...)`` makes one training run that logs the
    validation predictions (prediction = target +- abs_err) and registers a version of it."""
    from training.stages.ion_model import _log_val_predictions

    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    client = MlflowClient()
    client.create_registered_model(NAME)
    count = iter(range(1, 1000))

    def _publish(
        abs_err: np.ndarray | None,
        *,
        split: str = "s1",
        test_mae: float | None = None,
        ids: list[str] = IDS,
        alias: str = CANDIDATE,
    ) -> VersionInfo:
        k = next(count)
        with mlflow.start_run() as run:
            if abs_err is not None:
                out = tmp_path / f"run{k}" / "ion_Mg.csv"
                val = _ValSplit(ids, TARGETS[: len(ids)])
                pred = val.targets_ + SIGNS[: len(ids)] * abs_err[: len(ids)]
                written = _log_val_predictions(out, val, pred)  # type: ignore[arg-type]
                assert written == out.with_name("ion_Mg_val.csv")
        tags = {"split_hash": split, "ion": "Mg"}
        if test_mae is not None:
            tags["test_mae"] = str(test_mae)
        mv = client.create_model_version(
            NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
        )
        client.set_registered_model_alias(NAME, alias, mv.version)
        return VersionInfo(NAME, int(mv.version), run.info.run_id, tags)

    yield _publish
    mlflow.set_tracking_uri(None)


def _params(tmp_path: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text("ions: {Li: {}, Mg: {}}\nmlflow: {experiment: reg}\n")
    return params


def test_paired_comparison_matches_numpy() -> None:
    cand = {b: (t, t + e) for b, t, e in zip(IDS, TARGETS, _candidate_err(0.05, 0.2), strict=True)}
    champ = {b: (t, t - e) for b, t, e in zip(IDS, TARGETS, CHAMP_ERR, strict=True)}
    comp = paired_comparison(cand, champ)
    d = np.array([abs(cand[b][1] - cand[b][0]) - abs(champ[b][1] - champ[b][0]) for b in IDS])
    assert comp.n == N
    assert comp.mean_diff == pytest.approx(d.mean())
    assert comp.se_diff == pytest.approx(d.std(ddof=1) / np.sqrt(N))
    assert comp.candidate_mae - comp.champion_mae == pytest.approx(d.mean())


def test_gate_refuses_candidate_worse_beyond_paired_se(publish: Publish) -> None:
    champ = publish(CHAMP_ERR, alias=CHAMPION)
    worse = publish(_candidate_err(0.10, 0.15))  # SE 0.024 V: 4 SE worse
    with pytest.raises(PromotionRefused, match="worse") as exc:
        promote(NAME)
    msg = str(exc.value)
    assert "val MAE" in msg and "±" in msg and f"n={N}" in msg and "+0.1000" in msg
    assert by_alias(NAME, CHAMPION).version == champ.version
    assert worse.version != champ.version


def test_gate_accepts_slightly_worse_candidate_within_noise(publish: Publish) -> None:
    publish(CHAMP_ERR, alias=CHAMPION)
    cand = publish(_candidate_err(0.02, 0.30))  # 0.02 V worse, SE 0.047 V: noise
    info, reason = promote(NAME)
    assert info.version == cand.version == by_alias(NAME, CHAMPION).version
    assert "+0.0200" in reason and "± 0.0474" in reason and f"n={N}" in reason


def test_gate_accepts_better_candidate(publish: Publish) -> None:
    publish(CHAMP_ERR, alias=CHAMPION)
    cand = publish(_candidate_err(-0.10, 0.15))
    _, reason = promote(NAME)
    assert by_alias(NAME, CHAMPION).version == cand.version
    assert "-0.1000" in reason


def test_gate_refuses_different_split_hashes(publish: Publish) -> None:
    champ = publish(CHAMP_ERR, alias=CHAMPION)
    publish(_candidate_err(-0.10, 0.15), split="s2")  # better, but on another split
    with pytest.raises(PromotionRefused, match="different splits"):
        promote(NAME)
    assert by_alias(NAME, CHAMPION).version == champ.version


def test_gate_refuses_different_validation_crystals(publish: Publish) -> None:
    publish(CHAMP_ERR, alias=CHAMPION)
    publish(_candidate_err(-0.10, 0.15), ids=IDS[:-1])
    with pytest.raises(PromotionRefused, match="different crystals"):
        promote(NAME)


def test_gate_refuses_versions_without_validation_artifact_unless_forced(
    publish: Publish,
) -> None:
    old = publish(None, alias=CHAMPION)  # registered before the gate read validation
    new = publish(_candidate_err(-0.10, 0.15))
    with pytest.raises(PromotionRefused, match=rf"champion v{old.version} has no validation"):
        promote(NAME)
    _, reason = promote(NAME, force=True)
    assert reason == "forced" and by_alias(NAME, CHAMPION).version == new.version
    publish(None)  # and a candidate without one
    with pytest.raises(PromotionRefused, match="candidate v3 has no validation predictions"):
        promote(NAME)


def test_gate_never_reads_the_test_split(publish: Publish) -> None:
    """Test MAE tags pointing the opposite way (or absent) change neither decision nor reason."""
    champ = publish(CHAMP_ERR, alias=CHAMPION, test_mae=9.0)
    worse = publish(_candidate_err(0.10, 0.15), test_mae=0.01)  # "far better" on test
    better = publish(_candidate_err(-0.10, 0.15), test_mae=50.0)  # "far worse" on test

    def without_test(v: VersionInfo) -> VersionInfo:
        return dataclasses.replace(v, tags={k: x for k, x in v.tags.items() if k != "test_mae"})

    with pytest.raises(PromotionRefused) as tagged:
        check_gate(worse, champ)
    with pytest.raises(PromotionRefused) as untagged:
        check_gate(without_test(worse), without_test(champ))
    assert str(tagged.value) == str(untagged.value)
    assert check_gate(better, champ) == check_gate(without_test(better), without_test(champ))
    _, reason = promote(NAME, better.version)
    assert by_alias(NAME, CHAMPION).version == better.version and "test" not in reason


def test_promote_missing_version_or_model_is_one_line_exit_4(
    publish: Publish, tmp_path: Path
) -> None:
    from training.cli import app

    publish(CHAMP_ERR, alias=CHAMPION)
    with pytest.raises(NoSuchVersion, match="has no version 99"):
        promote(NAME, 99)
    args = ["promote", "--ion", "Mg", "--version", "99", "--params", str(_params(tmp_path))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 4, res.output
    assert res.stderr.strip().splitlines() == [f"error: {NAME} has no version 99"]
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["promote", "--ion", "Li", "--params", str(_params(tmp_path))])
    assert res.exit_code == 4, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "electrode-voltage-Li" in res.stderr


def test_promote_cli_exit_codes_for_refused_and_promoted(publish: Publish, tmp_path: Path) -> None:
    from training.cli import app

    publish(CHAMP_ERR, alias=CHAMPION)
    publish(_candidate_err(0.10, 0.15))
    args = ["promote", "--ion", "Mg", "--params", str(_params(tmp_path))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and res.stderr.startswith("refused:") and "worse" in res.stderr
    better = publish(_candidate_err(-0.10, 0.15))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"v{better.version} is now champion" in res.stdout and "val MAE" in res.stdout


def test_register_stage_tags_test_looks_and_reported_test_mae(
    publish: Publish, tmp_path: Path
) -> None:
    """Every ion_model run of the ion counts as one look at its test split (deleted runs too);
    other ions' runs and other stages do not."""
    from training.config import UsageError
    from training.stages.register import RegisterContext, register_ion

    client = MlflowClient()
    exp_id = mlflow.get_experiment_by_name("reg").experiment_id
    for ion, stage in (("Ca", "ion_model"), ("Ca", "ion_model"), ("Ca", "cv"), ("Mg", "ion_model")):
        with mlflow.start_run(tags={"stage": stage, "ion": ion}) as run:
            pass
    client.delete_run(run.info.run_id)  # Mg's look is counted although deleted

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context: object, model_input: list[str]) -> list[str]:
            return model_input

    with mlflow.start_run(tags={"stage": "ion_model", "ion": "Ca"}) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    ckpt = tmp_path / "Ca.pt"
    ckpt.write_bytes(b"weights")
    report = {"test_mae": 0.31234, "methods": {}, "model_uri": info.model_uri,
              "run_id": run.info.run_id}  # fmt: skip
    ctx = RegisterContext("electrode-voltage", "d1", True, experiment_id=exp_id)
    out = register_ion("Ca", report, ckpt, "s1", ctx)
    assert out["registered_now"] and out["auto_promoted"] == out["version"] == 1
    tags = client.get_model_version("electrode-voltage-Ca", "1").tags
    assert tags["test_looks"] == "3" and tags["test_mae"] == "0.3123"
    # reports pulled from another machine point at a model this store never logged: a usage
    # error naming the fix, and nothing registered
    (tmp_path / "Zn.pt").write_bytes(b"other weights")
    elsewhere = {**report, "model_uri": "models:/m-0123456789abcdef0123456789abcdef"}
    with pytest.raises(UsageError, match=r"not in the MLflow store .* ion_model@Zn"):
        register_ion("Zn", elsewhere, tmp_path / "Zn.pt", "s1", ctx)
    assert not client.search_model_versions("name='electrode-voltage-Zn'")


def test_ion_stage_logs_the_served_models_validation_predictions(
    publish: Publish, tiny_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source ion's stage writes ``<predictions stem>_val.csv`` with the served ensemble's
    validation predictions, logs it in the run the registered version points to, and the gate
    reads back exactly that (the production path: log_pyfunc, register, fetch)."""
    from tests.serving_fixtures import build_checkpoint
    from training.data.ion_inputs import IonInputs
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.registry import fetch_val_predictions, read_val_predictions, register
    from training.stages.ion_model import IonModelPaths, run_ion_stage
    from training.tracking import MlflowSettings
    from training.train.loaders import split_loader
    from training.transfer import TransferSettings
    from voltage_model.artifact import load_checkpoint

    monkeypatch.chdir(tmp_path)  # the stage's git/dvc tags read the working directory
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    ckpt = build_checkpoint(tmp_path / "li_src.pt", "Li", seed=3)
    baselines = tmp_path / "baselines_Li.csv"
    baselines.write_text("battery_id,target,mean\n" + "".join(
        f"{b},{y:.4f},3.0\n" for b, y in zip(data.ids("test"), data.targets("test"), strict=True)
    ))  # fmt: skip
    out = tmp_path / "out"
    report = run_ion_stage(
        IonInputs(data, store, "Li"),
        ckpt,
        TransferSettings(),
        MlflowSettings(experiment="reg"),
        IonModelPaths(baselines, out / "Li.pt", out / "ion_Li.json", out / "ion_Li.csv"),
    )
    assert "val_predictions" not in report and "test_predictions" not in report
    written = read_val_predictions(out / "ion_Li_val.csv")
    assert list(written) == data.ids("val")
    served = load_checkpoint(out / "Li.pt")
    means = np.concatenate(
        [served.predict_with_std(b)[0].double().numpy() for b in split_loader(store, data, "val")]
    )
    for (bid, (target, pred)), y, m in zip(
        written.items(), data.targets("val"), means, strict=True
    ):
        assert target == pytest.approx(y, abs=1e-4) and pred == pytest.approx(m, abs=1e-4), bid
    arts = [
        a.path for a in MlflowClient().list_artifacts(report["run_id"], "validation_predictions")
    ]
    assert arts == ["validation_predictions/ion_Li_val.csv"]
    version = register(report["model_uri"], "electrode-voltage-Li", {"split_hash": "s1"})
    assert version.run_id == report["run_id"]
    assert fetch_val_predictions(version) == written
