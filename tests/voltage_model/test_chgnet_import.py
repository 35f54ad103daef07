"""CHGNet's model class imported without its packages' heavy initialisers (issue 17.4): the
featuriser must not import CHGNet's ASE dynamics or VASP parsers, must give exactly the features
of a plain ``import chgnet.model``, and must leave ``chgnet.model`` importable in full afterwards
(the relaxation imports StructOptimizer from it).

Each case runs in a fresh interpreter: which modules a process has imported is the thing tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CIF = ROOT / "tests" / "fixtures" / "CoO2.cif"

FEATURISE = """
import json, sys
{before}
from voltage_model.structures import parse_structure
from voltage_model.models import chgnet_backbone
structure = parse_structure(open({cif!r}).read(), "cif")
feats, errors = chgnet_backbone.featurise([structure])
loaded = {{m: m in sys.modules for m in ("chgnet.model.dynamics", "chgnet.utils.vasp_utils",
                                        "ase.md", "pymatgen.io.vasp")}}
from chgnet.model import CHGNet, StructOptimizer
same = CHGNet is chgnet_backbone.chgnet_class() and type(chgnet_backbone.load_model()) is CHGNet
print(json.dumps({{"feats": feats.tolist(), "errors": errors, "loaded": loaded, "same": same,
                  "optimizer": StructOptimizer.__module__}}))
"""


def run(before: str) -> dict:
    code = FEATURISE.format(before=before, cif=str(CIF))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_featuriser_skips_dynamics_and_vasp_and_matches_the_full_import():
    light = run(before="")
    full = run(before="import chgnet.model")
    assert light["errors"] == [None]
    assert not any(light["loaded"].values()), light["loaded"]
    assert all(full["loaded"][m] for m in ("chgnet.model.dynamics", "chgnet.utils.vasp_utils"))
    assert light["feats"] == full["feats"]  # bit for bit: the same class and weights
    # afterwards the real packages import, around the one CHGNet class already loaded
    assert light["same"] and full["same"]
    assert light["optimizer"] == "chgnet.model.dynamics"
