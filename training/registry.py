"""The MLflow model registry: one registered model per ion, aliases instead of stages.

The pipeline registers a new version per ion and points alias ``candidate`` at it; a person
promotes by pointing ``champion`` at a version (MLflow UI, or ``voltage promote``). The command
line promotion is gated: a candidate whose test MAE is worse than the champion's on the same test
split is refused unless forced. Versions carry the split's hash so "the same test split" is checked,
not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CANDIDATE = "candidate"
CHAMPION = "champion"


def model_name(prefix: str, ion: str) -> str:
    return f"{prefix}-{ion}"


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    run_id: str | None
    tags: dict[str, str]

    @property
    def test_mae(self) -> float | None:
        v = self.tags.get("test_mae")
        return float(v) if v not in (None, "") else None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, int(mv.version), mv.run_id, dict(mv.tags or {}))


def register(
    model_uri: str, name: str, tags: dict[str, Any], alias: str = CANDIDATE
) -> VersionInfo:
    """Register ``model_uri`` as a new version of ``name``, tag it, point ``alias`` at it."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client = _client()
    client.set_registered_model_alias(name, alias, mv.version)
    return _info(client.get_model_version(name, mv.version))


def by_alias(name: str, alias: str) -> VersionInfo | None:
    from mlflow.exceptions import MlflowException

    try:
        return _info(_client().get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


class PromotionRefused(RuntimeError):
    """The gate said no: the candidate is worse, or not comparable, and ``force`` was not set."""


def check_gate(candidate: VersionInfo, champion: VersionInfo | None) -> str:
    """Why promotion is allowed; raises PromotionRefused when it is not."""
    if champion is None:
        return "no champion yet"
    if champion.version == candidate.version:
        raise PromotionRefused(f"{candidate.name} v{candidate.version} is already champion")
    c_split, p_split = candidate.tags.get("split_hash"), champion.tags.get("split_hash")
    if not c_split or c_split != p_split:
        raise PromotionRefused(
            f"{candidate.name}: candidate v{candidate.version} and champion v{champion.version} "
            f"were tested on different splits ({c_split} vs {p_split}); compare them on one split "
            "or use --force"
        )
    c_mae, p_mae = candidate.test_mae, champion.test_mae
    if c_mae is None or p_mae is None:
        raise PromotionRefused(f"{candidate.name}: a version lacks its test_mae tag; use --force")
    if c_mae > p_mae:
        raise PromotionRefused(
            f"{candidate.name}: candidate v{candidate.version} test MAE {c_mae:.4f} V is worse "
            f"than champion v{champion.version} {p_mae:.4f} V on the same test split"
        )
    return f"test MAE {c_mae:.4f} V <= champion's {p_mae:.4f} V"


def promote(name: str, version: int | None = None, force: bool = False) -> tuple[VersionInfo, str]:
    """Point ``champion`` at ``version`` (default: the candidate) if the gate allows it."""
    client = _client()
    if version is None:
        cand = by_alias(name, CANDIDATE)
        if cand is None:
            raise PromotionRefused(f"{name} has no '{CANDIDATE}' version to promote")
    else:
        cand = _info(client.get_model_version(name, str(version)))
    champ = by_alias(name, CHAMPION)
    reason = "forced" if force else check_gate(cand, champ)
    client.set_registered_model_alias(name, CHAMPION, cand.version)
    return cand, reason
