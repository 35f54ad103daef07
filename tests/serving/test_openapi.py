"""The OpenAPI document (``/docs.json``) tells the truth, and a client generated from it works.

Offline: the document :mod:`serving.openapi` completes says what to send (required fields, the
structure as text or object, examples), the real error shape for each status, ``Retry-After``
where the service sends it, and the package version.

Against a real ``bentoml serve`` (tiny real models, tests/serving_fixtures.py; Li and Mg with
champions, Na without):

* ``datamodel-code-generator`` (from the package index, pinned in the dev extra) generates
  pydantic models from the served ``/docs.json``; the test imports them, builds a request with
  the generated request model, posts it to the path and server the document names, and parses
  the answer with the generated response model (and errors with the generated ``Error``);
* every request example of the document is posted as is and gets 200 with a body that the
  document's 200 schema accepts; every documented error status that a request can provoke here
  (400, 413, 503 ``no_champion``) comes back with the documented body and headers (429 and 503
  ``overloaded``: tests/serving/test_overload.py);
* a ``multipart/form-data`` upload (``curl -F file=@CoO2.cif -F ion=Li``) equals the JSON call;
* Swagger UI itself (``/docs``, real headless Chromium where installed): "Try it out" ->
  "Execute" with each example of ``/predict`` shows 200.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.serving_fixtures import (
    REPO,
    VENV_BIN,
    MlflowStore,
    Server,
    http_json,
    served,
)

FIXTURE_CIF = REPO / "tests" / "fixtures" / "CoO2.cif"
MAX_BODY = 60_000
DOCUMENTED = {"/predict": {"200", "400", "413", "429", "500", "503", "504"},
              "/predict_batch": {"200", "400", "413", "429", "500", "503", "504"},
              "/models": {"200", "429", "500", "504"}}  # fmt: skip


# ------------------------------------------------------------------------------ offline
@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    from serving.openapi import complete
    from serving.service import VoltageService

    return complete(VoltageService.openapi_spec.asdict())


def test_document_says_what_to_send(document) -> None:
    import serving
    from serving.openapi import CIF_EXAMPLE

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert document["info"]["version"] == version == serving.__version__
    assert "charged" in document["info"]["description"]
    assert "BentoML" not in json.dumps(document["info"])
    assert FIXTURE_CIF.read_text() == CIF_EXAMPLE  # the example is a real CIF
    body = document["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema["required"] == ["ion"]
    forms = {f["type"] for f in schema["properties"]["structure"]["oneOf"]}
    assert forms == {"string", "object"}  # the pymatgen object form is an object
    assert schema["properties"]["structure"]["example"] == CIF_EXAMPLE
    assert "calibrated" in json.dumps(document["paths"]["/predict"]["post"]["responses"]["200"])
    examples = body["content"]["application/json"]["examples"]
    assert next(iter(examples)) == "cif" and len(examples) >= 3
    upload = body["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "ion"] and upload["properties"]["file"]["format"] == (
        "binary"
    )
    item = document["paths"]["/predict_batch"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["items"]  # fmt: skip
    assert item["required"] == ["ion"] and "root_input" not in json.dumps(document["paths"])


def test_document_lists_the_real_errors(document) -> None:
    schemas = document["components"]["schemas"]
    assert not {"InvalidArgument", "NotFound", "InternalServerError"} & set(schemas)
    assert schemas["Error"]["required"] == ["error", "kind", "status", "request_id"]
    for path, statuses in DOCUMENTED.items():
        responses = document["paths"][path]["post"]["responses"]
        assert set(responses) == statuses, path
        for status, resp in responses.items():
            assert "X-Request-ID" in resp["headers"]
            assert ("Retry-After" in resp["headers"]) == (status in ("429", "503"))
            if status == "200":
                continue
            content = resp["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}
            for example in content["examples"].values():
                assert example["value"]["status"] == int(status)
    kinds = {
        e["value"]["kind"]
        for e in document["paths"]["/predict"]["post"]["responses"]["503"]["content"][
            "application/json"]["examples"].values()
    }  # fmt: skip
    assert kinds == {"no_champion", "overloaded"}


# ------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openapi")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Any:
    # Na: registered, no champion: 503
    store = MlflowStore.published(workdir / "mlflow", {"Li": 1, "Mg": 2}, candidates={"Na": 3})
    with served(
        workdir, store, VOLTAGE_IONS="Li,Mg,Na", VOLTAGE_WORKERS="1",
        VOLTAGE_RELOAD_INTERVAL="60", VOLTAGE_DRIFT_REFERENCE="",
        VOLTAGE_MAX_BODY_BYTES=str(MAX_BODY),
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def served_document(server: Server) -> dict[str, Any]:
    status, doc = http_json(f"{server.url}/docs.json", method="GET")
    assert status == 200
    return doc


@pytest.fixture(scope="module")
def client_models(served_document: dict[str, Any], workdir: Path) -> ModuleType:
    """Pydantic models generated from the served document by datamodel-code-generator."""
    codegen = shutil.which("datamodel-codegen", path=str(VENV_BIN))
    if codegen is None:
        pytest.fail("datamodel-codegen missing: pip install -r requirements.lock (dev extra)")
    spec = workdir / "docs.json"
    spec.write_text(json.dumps(served_document))
    out = workdir / "voltage_client_models.py"
    run = subprocess.run(
        [codegen, "--input", str(spec), "--input-file-type", "openapi",
         "--openapi-scopes", "schemas", "paths", "--output-model-type", "pydantic_v2.BaseModel",
         "--formatters", "ruff-format", "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    module_spec = importlib.util.spec_from_file_location("voltage_client_models", out)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["voltage_client_models"] = module
    module_spec.loader.exec_module(module)
    return module


def _post(server: Server, path: str, body: bytes, **headers: str) -> Any:
    import httpx

    hdrs = {"Content-Type": "application/json", **headers}
    return httpx.post(f"{server.url}{path}", content=body, headers=hdrs, timeout=60)


def test_docs_json_is_the_completed_document(served_document, document) -> None:
    assert served_document["info"] == document["info"]
    assert served_document["paths"]["/predict"] == json.loads(
        json.dumps(document["paths"]["/predict"])
    )


def test_generated_client_calls_predict(server, served_document, client_models) -> None:
    m = client_models
    base = served_document["servers"][0]["url"]  # "." : relative to where the document is
    assert base == "."
    request = m.PredictPostRequest(ion="Li", structure=FIXTURE_CIF.read_text())
    resp = _post(server, "/predict", request.model_dump_json(exclude_none=True).encode())
    assert resp.status_code == 200, resp.text
    answer = m.PredictPostResponse.model_validate_json(resp.content)
    assert answer.ion == "Li" and answer.formula == "CoO2" and answer.n_sites == 9
    assert answer.model.name == "electrode-voltage-Li" and answer.uncertainty >= 0
    # The same crystal as a pymatgen object (the oneOf's object form) gives the same voltage.
    from serving.openapi import JSON_EXAMPLE

    request = m.PredictPostRequest(ion="Li", format="json", structure=JSON_EXAMPLE)
    resp = _post(server, "/predict", request.model_dump_json(exclude_none=True).encode())
    assert resp.status_code == 200, resp.text
    assert m.PredictPostResponse.model_validate_json(resp.content).voltage == pytest.approx(
        answer.voltage, rel=1e-5
    )
    # Errors parse with the generated Error model and carry the request id.
    request = m.PredictPostRequest(ion="Li", structure="not a crystal")
    resp = _post(server, "/predict", request.model_dump_json(exclude_none=True).encode(),
                 **{"X-Request-ID": "client-test-1"})  # fmt: skip
    error = m.Error.model_validate_json(resp.content)
    assert resp.status_code == error.status == 400 and error.kind == "parse"
    assert error.request_id == "client-test-1" == resp.headers["X-Request-ID"]
    # The batch endpoint through its generated root model.
    items = m.PredictBatchPostRequest([m.PredictBatchPostRequestItem(ion="Mg",
                                       structure=FIXTURE_CIF.read_text())])  # fmt: skip
    resp = _post(server, "/predict_batch", items.model_dump_json(exclude_none=True).encode())
    assert resp.status_code == 200, resp.text
    batch = m.PredictBatchPostResponse.model_validate_json(resp.content)
    assert batch.root[0].ok and batch.root[0].prediction.ion == "Mg"


def test_every_request_example_gets_200(server, served_document, client_models) -> None:
    m = client_models
    models = {"/predict": m.PredictPostResponse, "/predict_batch": m.PredictBatchPostResponse}
    posted = 0
    for path, response_model in models.items():
        content = served_document["paths"][path]["post"]["requestBody"]["content"]
        for name, example in content["application/json"]["examples"].items():
            resp = _post(server, path, json.dumps(example["value"]).encode())
            assert resp.status_code == 200, (path, name, resp.text)
            response_model.model_validate_json(resp.content)
            posted += 1
    assert posted >= 5


def test_documented_errors_occur_with_the_documented_body(server, client_models) -> None:
    m = client_models
    cases = [
        (400, "unknown_ion", json.dumps({"ion": "Xx", "structure": "x"}).encode()),
        (400, "parse", json.dumps({"ion": "Li", "explain": [1]}).encode()),  # BentoML's check
        (413, "too_large", json.dumps({"ion": "Li", "structure": "x" * MAX_BODY}).encode()),
        (503, "no_champion", json.dumps({"ion": "Na", "structure": "x"}).encode()),
    ]
    for status, kind, body in cases:
        resp = _post(server, "/predict", body)
        error = m.Error.model_validate_json(resp.content)
        assert (resp.status_code, error.status, error.kind) == (status, status, kind), resp.text
        assert error.request_id == resp.headers["X-Request-ID"]
    missing = http_json(f"{server.url}/web/nothing.js", method="GET")
    assert missing[0] == 404 and missing[1]["kind"] == "not_found" and missing[1]["request_id"]


def test_multipart_upload_equals_the_json_call(server) -> None:
    import httpx

    text = FIXTURE_CIF.read_text()
    want = _post(server, "/predict", json.dumps({"ion": "Li", "structure": text}).encode())
    with FIXTURE_CIF.open("rb") as fh:  # curl -F file=@CoO2.cif -F ion=Li
        resp = httpx.post(f"{server.url}/predict", files={"file": ("CoO2.cif", fh)},
                          data={"ion": "Li"}, timeout=60)  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.json()["voltage"] == pytest.approx(want.json()["voltage"], rel=1e-6)
    poscar = {"file": ("POSCAR", FIXTURE_CIF.read_text().encode())}  # a CIF named POSCAR
    resp = httpx.post(f"{server.url}/predict", files=poscar, data={"ion": "Li"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["kind"] == "parse"  # read as POSCAR
    assert "poscar" in resp.json()["error"].lower()
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-s", "-F", f"file=@{FIXTURE_CIF}", "-F", "ion=Li", f"{server.url}/predict"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert json.loads(out.stdout)["voltage"] == pytest.approx(want.json()["voltage"])


# ------------------------------------------------------------------------------ Swagger UI
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(workdir: Path) -> Any:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium / chromium-driver not installed (scripts/setup.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={workdir / 'chromium'}"):
        options.add_argument(arg)  # fmt: skip
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_swagger_try_it_out_succeeds_with_every_example(server, browser, workdir) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait(check: Any, what: str, timeout: float = 45) -> Any:
        try:
            return WebDriverWait(browser, timeout, 0.2).until(lambda _: check())
        except Exception:
            browser.save_screenshot(str(workdir / "swagger-failed.png"))
            raise AssertionError(f"Swagger UI: {what} not seen; {workdir / 'swagger-failed.png'}"
                                 ) from None  # fmt: skip

    browser.get(f"{server.url}/docs")
    op = wait(lambda: browser.find_element(By.CSS_SELECTOR, "[id$='VoltageService__predict']"),
              "the /predict operation")  # fmt: skip
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(lambda: op.find_element(By.CSS_SELECTOR, ".try-out__btn"), "Try it out").click()
    select = wait(lambda: op.find_element(By.CSS_SELECTOR, ".examples-select select"),
                  "the examples menu")  # fmt: skip
    names = [o.get_attribute("value") for o in Select(select).options]
    assert names[:3] == ["cif", "poscar", "json_object"], names
    for name in names:
        Select(op.find_element(By.CSS_SELECTOR, ".examples-select select")).select_by_value(name)
        body = op.find_element(By.CSS_SELECTOR, "textarea.body-param__text").get_attribute("value")
        assert json.loads(body)["ion"] == "Li"
        op.find_element(By.CSS_SELECTOR, "button.execute").click()

        def answered() -> str | None:
            cells = op.find_elements(
                By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"
            )
            text = cells[0].text.strip() if cells else ""
            return text or None

        status = wait(answered, f"the answer to example {name}")
        assert status.startswith("200"), (name, status)
        shown = op.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
        assert json.loads(shown)["formula"] == "CoO2"
        browser.save_screenshot(str(workdir / f"swagger-{name}.png"))
        clear = op.find_elements(By.CSS_SELECTOR, "button.btn-clear")
        if clear:
            clear[0].click()
            wait(lambda: not op.find_elements(By.CSS_SELECTOR, ".live-responses-table"),
                 "the answer cleared")  # fmt: skip
