#!/usr/bin/env python3
"""Check that every command in the operator docs can work as written.

    python3 scripts/check-docs.py

Reads the ```sh code blocks of README.md, docs/operations.md and
bench/README.md and checks each command the way it can be exercised on a
machine without a Docker engine or a Kubernetes cluster:

  docker compose ...   the subcommand and its flags exist in Compose v2; every
                       service exists in docker-compose.yml; exec/run commands
                       use binaries of that service's image, paths it mounts,
                       hosts, ports and routes that exist, nginx's -p/-c as the
                       service starts it
  kubectl ...          the namespace and every resource it names exist in the
                       `kubectl kustomize` output of k8s/ or k8s/production/
                       (or the files their kustomization.yaml lists), its
                       flags in `kubectl VERB --help`; a created Secret's keys
                       are ones an overlay reads
  scripts/X.sh ...     tracked by git, executable when run directly, every flag
                       handled by the script's option parsing, every variable
                       set in front of it read by it
  croupier / cargo run run for real against the debug binary in a temporary
                       DATA_DIR (embedded SQLite); PostgreSQL commands against
                       a throwaway server when its binaries are installed
  curl ...             the path and method exist in the running debug
                       instance's OpenAPI document (through nginx: a proxied
                       location), Prometheus endpoints enabled by its flags
  promtool / openssl   run for real (promtool on the repository's files)
  anything else        a specific check, or the ALLOWED list below with a
                       reason; any other command form fails

Commands quoted in prose (`...` spans starting like one of the kinds above)
get the same checks; quoted repository paths and relative links must exist
(or, for generated files such as nginx/certs/, be ignored by git).

Prints one line per failing command (file:line: why), a summary by kind, and
exits non-zero when a command could not work as written. Standard library
only; everything it starts listens on loopback and is stopped on exit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/operations.md", "bench/README.md"]

# Command forms that are not checked beyond their shape, each with the reason.
ALLOWED = [
    (r"git pull", "plain git: nothing in it is specific to this repository"),
    (r"sleep \d+", "the retry delay of a shell loop"),
]

# Names the docs use before the step that creates them, with the reason.
HYPOTHETICAL_SERVICES = {
    ("docs/operations.md", "app4"): "the Scaling section adds app4 to docker-compose.yml in step 1",
}

# ------------------------------------------------------------------ reporting

FAILURES: list[str] = []
KINDS: Counter = Counter()


class Cmd:
    def __init__(self, file: str, line: int, text: str, argv: list[str], env: dict[str, str], block: "Block"):
        self.file, self.line, self.text, self.argv, self.env, self.block = file, line, text, argv, env, block
        self.kind = "?"

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def fail(self, why: str) -> None:
        FAILURES.append(f"{self.where()}: `{self.text}`: {why}")


class Block:
    """State shared by the commands of one code block (what earlier lines made)."""

    def __init__(self) -> None:
        self.loop_vars: dict[str, list[str]] = {}
        self.pods: dict[str, list[str]] = {}  # kubectl run NAME -> its mount paths
        self.files: set[str] = set()  # local files written by earlier commands
        self.forwarded_ports: set[str] = set()


# ------------------------------------------------------------------ tiny YAML

class MiniYaml:
    """The YAML subset of this repository's compose and Kubernetes files:
    block mappings and sequences, flow sequences, quoted and block scalars,
    anchors, aliases and `<<` merges. Scalars stay strings."""

    KEY = re.compile(r"""^("(?:[^"\\]|\\.)*"|'[^']*'|[^\s'"#\-\[{][^:#]*?|-[^\s:#][^:#]*?)\s*:(?:\s+(.*))?$""")

    def __init__(self, text: str):
        self.anchors: dict[str, object] = {}
        self.docs: list[object] = []
        chunk: list[str] = []
        for line in text.splitlines() + ["---"]:
            if re.match(r"^---\s*$", line) or line.startswith("--- "):
                if any(self._strip(l).strip() for l in chunk):
                    self.lines = chunk
                    self.docs.append(self._node(0, 0)[0])
                chunk = []
            else:
                chunk.append(line)

    @staticmethod
    def _strip(line: str) -> str:
        quote, prev = None, " "
        for i, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (prev in " :[{,-" or i == 0):
                quote = ch
            elif ch == "#" and prev in " \t":
                return line[:i].rstrip()
            prev = ch
        return line.rstrip()

    def _next(self, i: int) -> tuple[int, int, str]:
        while i < len(self.lines):
            s = self._strip(self.lines[i])
            if s.strip():
                return i, len(s) - len(s.lstrip()), s.strip()
            i += 1
        return i, -1, ""

    def _node(self, i: int, min_indent: int):
        i, ind, s = self._next(i)
        if ind < min_indent or not s:
            return None, i
        if s == "-" or s.startswith("- "):
            return self._seq(i, ind)
        if self.KEY.match(s):
            return self._map(i, ind)
        return self._scalar(s), i + 1

    def _seq(self, i: int, ind: int):
        out = []
        while True:
            i, nind, s = self._next(i)
            if nind != ind or not (s == "-" or s.startswith("- ")):
                return out, i
            item = s[1:].strip()
            if not item:
                val, i = self._node(i + 1, ind + 1)
            elif self.KEY.match(item) or item.startswith("&"):
                col = self.lines[i].index("-") + 1
                col += len(self.lines[i][col:]) - len(self.lines[i][col:].lstrip())
                self.lines[i] = " " * col + self.lines[i][col:]
                val, i = self._node(i, col)
            else:
                val, i = self._value(item, i, ind)
            out.append(val)

    def _map(self, i: int, ind: int):
        out: dict = {}
        while True:
            i, nind, s = self._next(i)
            m = self.KEY.match(s) if nind == ind else None
            if not m:
                return out, i
            key, rest = self._scalar(m.group(1)), (m.group(2) or "").strip()
            anchor = None
            am = re.match(r"^&(\S+)\s*(.*)$", rest)
            if am:
                anchor, rest = am.group(1), am.group(2)
            if rest:
                val, i = self._value(rest, i, ind)
            else:
                j, cind, cs = self._next(i + 1)
                if cind > ind or (cind == ind and (cs == "-" or cs.startswith("- "))):
                    val, i = self._node(j, cind)
                else:
                    val, i = None, i + 1
            if anchor:
                self.anchors[anchor] = val
            if key == "<<":
                for src in val if isinstance(val, list) else [val]:
                    for k, v in (src or {}).items():
                        out.setdefault(k, v)
            else:
                out[key] = val

    def _value(self, rest: str, i: int, ind: int):
        if rest.startswith("*"):
            return self.anchors.get(rest[1:].strip()), i + 1
        if rest[0] in "|>":
            body, j = [], i + 1
            while j < len(self.lines):
                line = self.lines[j]
                if line.strip() and len(line) - len(line.lstrip()) <= ind:
                    break
                body.append(line)
                j += 1
            pad = min((len(l) - len(l.lstrip()) for l in body if l.strip()), default=0)
            return "\n".join(l[pad:] for l in body).rstrip("\n") + "\n", j
        j = i + 1
        while True:  # plain scalars continued on more-indented lines
            k, nind, s = self._next(j)
            if nind > ind and not rest.startswith(("[", "{", '"', "'")):
                rest += " " + s
                j = k + 1
            else:
                break
        return self._scalar(rest), j

    @staticmethod
    def _scalar(s: str):
        s = s.strip()
        if s.startswith("[") or s.startswith("{"):
            try:
                return json.loads(s)
            except ValueError:
                inner = s[1:-1].strip()
                items = [MiniYaml._scalar(x) for x in inner.split(",") if x.strip()]
                return items if s[0] == "[" else {}
        if s.startswith('"') and s.endswith('"') and len(s) >= 2:
            try:
                return json.loads(s)
            except ValueError:
                return s[1:-1]
        if s.startswith("'") and s.endswith("'") and len(s) >= 2:
            return s[1:-1].replace("''", "'")
        return s


def yaml_docs(text: str) -> list:
    return [d for d in MiniYaml(text).docs if d is not None]


# ------------------------------------------------------------------ helpers

def run(argv, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def git_tracked(rel: str) -> str | None:
    """The git mode of a tracked file (e.g. 100755), or None."""
    out = run(["git", "-C", str(ROOT), "ls-files", "-s", "--", rel]).stdout.split()
    return out[0] if out else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_kubectl() -> str | None:
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    if shutil.which("kubectl"):
        return shutil.which("kubectl")
    cache = os.environ.get("CHECK_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "croupier-check-deploy")
    venv_kubectl = os.path.join(cache, "venv", "bin", "kubectl")
    return venv_kubectl if os.access(venv_kubectl, os.X_OK) else None


def expand(word: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), word)


# ------------------------------------------------------------------ extraction

SEPARATORS = {";", "&&", "||", "&", "|", ";;", "(", ")", "\n"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", ">|", "&>>"}
STRUCTURE_PREFIX = {"do", "then", "else", "until", "while", "if", "!", "elif"}
STRUCTURE_ONLY = {"done", "fi", "esac", "{", "}"}


def extract() -> list[tuple[str, int, str, list[str], bool, Block]]:
    """(file, line, text, tokens, backgrounded, block) for every simple command."""
    out = []
    for rel in DOCS:
        lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*```(\w*)\s*$", lines[i])
            if not m or m.group(1) not in ("sh", "bash", "shell", "console"):
                i += 1
                continue
            block = Block()
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                start, text = i + 1, lines[i].strip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                i += 1
                lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                lexer.commenters = "#"
                try:
                    tokens = list(lexer)
                except ValueError as e:
                    FAILURES.append(f"{rel}:{start}: `{text}`: does not parse as shell ({e})")
                    continue
                current: list[str] = []
                for k, tok in enumerate(tokens + [";"]):
                    if tok in SEPARATORS:
                        if current:
                            out.append((rel, start, text, current, tok == "&", block))
                        current = []
                    elif tok in REDIRECTS:
                        if current and current[-1].isdigit():
                            current.pop()
                        current.append("\0redirect")
                    elif current and current[-1] == "\0redirect":
                        current.pop()
                    else:
                        current.append(tok)
            i += 1
    return out


INLINE_FIRST = ("docker", "kubectl", "bash", "sh", "croupier", "cargo", "curl", "promtool", "openssl")


def extract_inline() -> list[tuple[str, int, str, list[str], bool, Block]]:
    """Commands quoted in prose (`...` spans outside code blocks) that start
    like one of the checked kinds; a lone path is only checked to exist."""
    out = []
    for rel in DOCS:
        lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
        fenced, keep = False, []
        for line in lines:
            if re.match(r"^\s*```", line):
                fenced = not fenced
                keep.append("")
            else:
                keep.append("" if fenced else line)
        text = "\n".join(keep)
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", text):  # relative links
            target = m.group(1)
            if not re.match(r"^[a-z]+:", target) and not (ROOT / rel).parent.joinpath(target).exists():
                FAILURES.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: link to {target}: no such file")
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            line = text.count("\n", 0, m.start()) + 1
            try:
                tokens = shlex.split(span)
            except ValueError:
                continue
            words = [t for t in tokens if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", t)]
            if not words:
                continue
            if len(tokens) == 1 and re.fullmatch(r"[\w./-]+\.md", span):
                if not (ROOT / span).exists() and not (ROOT / rel).parent.joinpath(span).exists():
                    FAILURES.append(f"{rel}:{line}: `{span}`: no such document")
                continue
            if len(tokens) == 1 and re.match(r"^(scripts|k8s|nginx|prometheus|grafana|docs|bench|src|migrations)/", span):
                ignored = run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", span]).returncode == 0
                if not (ROOT / span).exists() and not ignored:  # ignored: made at run time (certificates)
                    FAILURES.append(f"{rel}:{line}: `{span}`: no such file or directory, and not a generated (git-ignored) one")
                continue
            if words[0] not in INLINE_FIRST and not words[0].startswith("scripts/"):
                continue
            if words[0] == "curl" and not any(w.startswith("http") for w in words):
                continue  # a curl option named in prose, e.g. `curl -k`
            if words[0] == "croupier" and len(words) == 1:
                continue
            out.append((rel, line, span, tokens, False, Block()))
    return out


# ------------------------------------------------------------------ compose

COMPOSE_SUBCOMMANDS = {
    "attach", "build", "config", "cp", "create", "down", "events", "exec", "images", "kill", "logs",
    "ls", "pause", "port", "ps", "pull", "push", "restart", "rm", "run", "scale", "start", "stats",
    "stop", "top", "unpause", "up", "version", "wait", "watch",
}
# Flags of Compose v2 used or likely in these docs; True = takes a value.
COMPOSE_FLAGS = {
    "up": {"-d": False, "--detach": False, "--build": False, "--no-deps": False, "--force-recreate": False,
           "--no-build": False, "--remove-orphans": False, "--wait": False, "--scale": True, "-t": True},
    "exec": {"-T": False, "--no-TTY": False, "-d": False, "-u": True, "--user": True, "-e": True,
             "--env": True, "-w": True, "--workdir": True, "--index": True},
    "run": {"--rm": False, "-T": False, "-d": False, "-e": True, "--entrypoint": True, "--no-deps": False,
            "--name": True, "-u": True, "-v": True, "-w": True, "--service-ports": False},
    "logs": {"-f": False, "--follow": False, "--tail": True, "-t": False, "--timestamps": False,
             "--since": True, "--no-color": False},
    "down": {"-v": False, "--volumes": False, "--remove-orphans": False, "--rmi": True, "-t": True},
    "build": {"--no-cache": False, "--pull": False, "-q": False},
    "cp": {"-a": False, "--archive": False, "-L": False, "--follow-link": False, "--index": True},
    "stop": {"-t": True, "--timeout": True}, "restart": {"-t": True}, "start": {},
    "ps": {"-a": False, "-q": False, "--services": False}, "pull": {"-q": False}, "config": {"-q": False, "--services": False},
}
# What the images' shells offer (Alpine images ship busybox).
BUSYBOX = {"sh", "ls", "cat", "wget", "cp", "mv", "rm", "mkdir", "echo", "env", "ps", "kill", "sleep",
           "tar", "gzip", "find", "grep", "df", "du", "head", "tail", "date", "test", "[", "true"}
IMAGE_BINARIES = {
    "nginx": BUSYBOX | {"nginx"},
    "postgres": BUSYBOX | {"psql", "pg_dump", "pg_restore", "pg_isready", "createdb", "dropdb"},
    "redis": BUSYBOX | {"redis-cli", "redis-server"},
}
REDIS_COMMANDS = {"FLUSHALL", "FLUSHDB", "PING", "INFO", "DBSIZE", "KEYS", "SCAN", "MONITOR"}


class Compose:
    def __init__(self) -> None:
        text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
        self.data = yaml_docs(text)[0]
        self.services: dict = self.data.get("services") or {}
        names = self._cli_services()
        self.names = names if names is not None else set(self.services)
        self.source = "compose config --services" if names is not None else "docker-compose.yml (parsed)"

    def _cli_services(self) -> set[str] | None:
        env = str(ROOT / ".env.example")
        for argv in (["docker", "compose"], ["docker-compose"]):
            if not shutil.which(argv[0]):
                continue
            try:
                p = run(argv + ["--project-directory", str(ROOT), "--env-file", env,
                                "-f", str(ROOT / "docker-compose.yml"), "config", "--services"], timeout=60)
            except subprocess.TimeoutExpired:
                continue
            if p.returncode == 0 and p.stdout.split():
                return set(p.stdout.split())
        return None

    def mounts(self, service: str) -> list[tuple[str, str]]:
        """(source, target) of each volume; source './x' is a bind mount."""
        out = []
        for v in self.services.get(service, {}).get("volumes") or []:
            if isinstance(v, str):
                parts = v.split(":")
                out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
            elif isinstance(v, dict):
                out.append((v.get("source", ""), v.get("target", "")))
        return out

    def image_kind(self, service: str) -> str:
        svc = self.services.get(service, {})
        if "build" in svc:
            return "croupier"
        image = str(svc.get("image", ""))
        name = image.split("/")[-1].split(":")[0]
        return name

    def command(self, service: str) -> list[str]:
        cmd = self.services.get(service, {}).get("command")
        return cmd if isinstance(cmd, list) else shlex.split(cmd or "")

    def published(self) -> dict[str, str]:
        """host port -> service, with defaults of ${VAR:-default} applied."""
        out = {}
        for name, svc in self.services.items():
            for p in svc.get("ports") or []:
                p = re.sub(r"\$\{[A-Za-z_]+:-([^}]*)\}", r"\1", str(p))
                parts = p.split(":")
                host = parts[-2] if len(parts) >= 2 else parts[-1]
                out[host] = name
        return out


def check_compose(cmd: Cmd, ctx: "Context") -> None:
    args = cmd.argv[2:]
    if not args:
        return cmd.fail("no compose subcommand")
    sub, rest = args[0], args[1:]
    if sub not in COMPOSE_SUBCOMMANDS:
        return cmd.fail(f"`{sub}` is not a docker compose subcommand")
    flags = COMPOSE_FLAGS.get(sub, {})
    positionals: list[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        # For exec/run, everything after the service belongs to the container command.
        if positionals and sub in ("exec", "run"):
            positionals.extend(rest[i:])
            break
        if a.startswith("-") and a != "-":
            name = a.split("=", 1)[0]
            if name not in flags:
                return cmd.fail(f"`{name}` is not a flag of `docker compose {sub}` known to this check")
            if flags[name] and "=" not in a:
                i += 1
        else:
            positionals.append(a)
        i += 1
    compose = ctx.compose

    def service_ok(name: str) -> bool:
        if name in compose.names:
            return True
        reason = HYPOTHETICAL_SERVICES.get((cmd.file, name))
        if reason:
            ctx.notes.append(f"{cmd.where()}: service {name} does not exist: {reason}")
            return True
        cmd.fail(f"no service `{name}` in docker-compose.yml ({compose.source}: {', '.join(sorted(compose.names))})")
        return False

    if sub in ("exec", "run"):
        if not positionals:
            return cmd.fail(f"`docker compose {sub}` without a service")
        service, inner = positionals[0], positionals[1:]
        if not service_ok(service):
            return
        if service not in compose.services:
            return
        if sub == "run" and not inner:
            inner = compose.command(service)
        check_in_container(cmd, ctx, service, inner, sub)
    elif sub == "cp":
        if len(positionals) != 2:
            return cmd.fail("`docker compose cp` takes a source and a destination")
        inside = [p for p in positionals if re.match(r"^[A-Za-z0-9_.-]+:/", p)]
        if len(inside) != 1:
            return cmd.fail("exactly one of the two paths must be SERVICE:/path")
        service, path = inside[0].split(":", 1)
        if service_ok(service) and service in compose.services:
            check_container_path(cmd, ctx, service, path)
    else:
        for p in positionals:
            service_ok(p)


def check_container_path(cmd: Cmd, ctx: "Context", service: str, path: str) -> bool:
    for source, target in ctx.compose.mounts(service):
        target = target.rstrip("/")
        if path == target or path.startswith(target + "/"):
            if source.startswith((".", "/")):
                host = (ROOT / source / path[len(target):].lstrip("/")).resolve()
                if not host.exists():
                    cmd.fail(f"{path} is mounted from {source} but {host.relative_to(ROOT)} does not exist")
                    return False
            elif path.endswith(".dump") and not re.search(r"/croupier-\d{8}T\d{6}Z\.dump$", path):
                cmd.fail(f"{path} is not named like the dumps scripts/backup.sh writes (croupier-YYYYmmddTHHMMSSZ.dump)")
                return False
            return True
    cmd.fail(f"{path} is not in a volume of service {service} ({', '.join(t for _, t in ctx.compose.mounts(service)) or 'none'})")
    return False


def check_in_container(cmd: Cmd, ctx: "Context", service: str, inner: list[str], sub: str) -> None:
    compose = ctx.compose
    kind = compose.image_kind(service)
    if kind == "croupier":
        # ENTRYPOINT ["croupier"]: `run` arguments are croupier subcommands.
        if sub == "run":
            ctx.deferred.append(lambda: check_subcommand(cmd, ctx, inner))
        elif inner and inner[0] != "croupier":
            cmd.fail(f"the croupier image has no `{inner[0]}` to exec (only the croupier binary is installed)")
        return
    binaries = IMAGE_BINARIES.get(kind)
    if binaries is None:
        return cmd.fail(f"no list of the binaries of image `{kind}` (service {service}) in this check")
    if not inner:
        return cmd.fail("nothing to run in the container")
    prog = inner[0]
    if prog not in binaries:
        return cmd.fail(f"`{prog}` is not in the {kind} image of service {service}")
    for a in inner[1:]:
        if a.startswith("/") and not a.startswith("/var/cache/nginx"):
            if not check_container_path(cmd, ctx, service, a):
                return
    if prog == "sh" and len(inner) > 1 and inner[1].startswith("/"):
        for source, target in compose.mounts(service):
            if inner[1].startswith(target.rstrip("/") + "/") and source.startswith("."):
                host = ROOT / source / inner[1][len(target.rstrip("/")) + 1:]
                first = host.read_text(encoding="utf-8").splitlines()[0] if host.is_file() else ""
                if "bash" in first:
                    cmd.fail(f"{host.relative_to(ROOT)} needs bash; the {kind} image has only sh")
    if prog == "nginx":
        svc_cmd = compose.command(service)
        def opt(argv, flag, default=None):
            return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else default
        for flag, default in (("-p", "/etc/nginx/"), ("-c", "/etc/nginx/nginx.conf")):
            want, got = opt(svc_cmd, flag, default), opt(inner, flag, default)
            if want != got:
                cmd.fail(f"nginx {flag} {got} differs from the service's {flag} {want}: the signal would miss the running master")
        if "-s" in inner and opt(inner, "-s") not in ("stop", "quit", "reopen", "reload"):
            cmd.fail(f"nginx -s {opt(inner, '-s')} is not a signal nginx knows")
    if prog == "redis-cli":
        words = [a for a in inner[1:] if not a.startswith("-")]
        if not words or words[0].upper() not in REDIS_COMMANDS:
            cmd.fail("redis-cli without a known command")
    if prog == "wget":
        urls = [a for a in inner[1:] if a.startswith("http")]
        for url in urls:
            m = re.match(r"^https?://([^/:]+)(?::(\d+))?(/[^?]*)?", url)
            host, port, path = m.group(1), m.group(2) or "80", m.group(3) or "/"
            if host not in compose.names:
                cmd.fail(f"{host} is not a compose service")
            elif compose.image_kind(host) != "croupier":
                cmd.fail(f"{host} is not a croupier instance")
            else:
                if port != ctx.app_port:
                    cmd.fail(f"port {port}: the croupier image listens on {ctx.app_port}")
                ctx.deferred.append(lambda p=path: check_route(cmd, ctx, "GET", p))


# ------------------------------------------------------------------ kubectl

KIND_ALIASES = {
    "deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
    "statefulset": "StatefulSet", "statefulsets": "StatefulSet", "sts": "StatefulSet",
    "job": "Job", "jobs": "Job", "cronjob": "CronJob", "cronjobs": "CronJob", "cj": "CronJob",
    "pod": "Pod", "pods": "Pod", "po": "Pod", "pvc": "PersistentVolumeClaim",
    "persistentvolumeclaim": "PersistentVolumeClaim", "secret": "Secret", "secrets": "Secret",
    "configmap": "ConfigMap", "cm": "ConfigMap", "service": "Service", "svc": "Service",
    "ingress": "Ingress", "hpa": "HorizontalPodAutoscaler", "namespace": "Namespace", "ns": "Namespace",
}
KUBECTL_VERBS = {"apply", "wait", "rollout", "scale", "port-forward", "exec", "cp", "delete", "run", "create",
                 "get", "describe", "logs"}


# The kustomize overlays: in-cluster services for trying it out, and
# managed services with Secrets the operator creates.
OVERLAYS = ("k8s", "k8s/production")


class Kube:
    def __init__(self) -> None:
        self.kubectl = find_kubectl()
        self.help_cache: dict[tuple, str] = {}
        # Per overlay: the rendered documents (or, without kubectl, the
        # resources and, separately, the patches, which only add references).
        self.overlays: dict[str, list] = {}
        self.patches: dict[str, list] = {}
        for overlay in OVERLAYS:
            if self.kubectl:
                p = run([self.kubectl, "kustomize", str(ROOT / overlay)], timeout=120)
                if p.returncode != 0:
                    raise SystemExit(f"check-docs: kubectl kustomize {overlay}/ failed:\n{p.stderr}")
                self.overlays[overlay] = yaml_docs(p.stdout)
            else:
                self.patches[overlay] = []
                self.overlays[overlay] = self._parse_files(ROOT / overlay, patches=self.patches[overlay])
        shown = " and ".join(f"{o}/" for o in OVERLAYS)
        self.source = f"kubectl kustomize {shown}" if self.kubectl else f"{shown} YAML files (no kubectl)"
        self.docs = [d for docs in self.overlays.values() for d in docs]
        self.objects = {}
        for d in self.docs:
            if isinstance(d, dict) and "kind" in d:
                md = d.get("metadata") or {}
                ns = md.get("namespace") or ("" if d["kind"] == "Namespace" else "default")
                self.objects[(d["kind"], md.get("name"), ns)] = d
        self.namespaces = {n for (k, n, _) in self.objects if k == "Namespace"}

    def _parse_files(self, directory: Path, namespace: str | None = None, patches: list | None = None) -> list:
        kust = yaml_docs((directory / "kustomization.yaml").read_text(encoding="utf-8"))[0]
        ns = kust.get("namespace") or namespace
        docs = []
        for res in kust.get("resources") or []:
            path = directory / res
            if path.is_dir():
                docs += self._parse_files(path, ns, patches)
            else:
                docs += yaml_docs(path.read_text(encoding="utf-8"))
        for patch in kust.get("patches") or []:
            if patches is not None and isinstance(patch, dict) and patch.get("path"):
                patches += yaml_docs((directory / patch["path"]).read_text(encoding="utf-8"))
        for gen in kust.get("configMapGenerator") or []:
            docs.append({"kind": "ConfigMap", "metadata": {"name": gen["name"]}})
        for d in docs:
            if isinstance(d, dict) and ns and d.get("kind") != "Namespace":
                d.setdefault("metadata", {}).setdefault("namespace", ns)
        return docs

    def get(self, kind: str, name: str, ns: str):
        return self.objects.get((kind, name, ns))

    def secret_keys(self, overlay: str, secret: str) -> set[str] | None:
        """The keys of Secret `secret` that the overlay reads or defines
        (None if it does not use that Secret at all; an empty set if it mounts
        or imports the whole Secret)."""
        keys: set[str] = set()
        used = False

        def walk(node) -> None:
            nonlocal used
            if isinstance(node, dict):
                if node.get("kind") == "Secret" and (node.get("metadata") or {}).get("name") == secret:
                    used = True
                    keys.update((node.get("data") or {}).keys(), (node.get("stringData") or {}).keys())
                ref = node.get("secretKeyRef")
                if isinstance(ref, dict) and ref.get("name") == secret:
                    used = True
                    keys.add(ref.get("key"))
                vol = node.get("secret")
                if isinstance(vol, dict) and secret in (vol.get("secretName"), vol.get("name")):
                    used = True
                    keys.update(i.get("key") for i in vol.get("items") or [])
                ref = node.get("secretRef")
                if isinstance(ref, dict) and ref.get("name") == secret:
                    used = True
                if node.get("secretName") == secret:
                    used = True
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.overlays.get(overlay, []) + self.patches.get(overlay, []))
        return keys if used else None

    def help(self, words: tuple) -> str | None:
        if not self.kubectl:
            return None
        if words not in self.help_cache:
            self.help_cache[words] = run([self.kubectl, *words, "--help"], timeout=30).stdout
        return self.help_cache[words]


def pod_spec(obj: dict) -> dict:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return ((spec.get("template") or {}).get("spec")) or spec


def check_kubectl(cmd: Cmd, ctx: "Context") -> None:
    kube, argv = ctx.kube, cmd.argv[1:]
    ns, words, flags, tail = "default", [], [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            tail = argv[i + 1:]
            break
        if a in ("-n", "--namespace"):
            ns = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
            continue
        if a.startswith("--namespace="):
            ns = a.split("=", 1)[1]
        elif a.startswith("-"):
            flags.append(a)
            if a in ("-k", "-f", "-c") and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            words.append(a)
        i += 1
    if not words or words[0] not in KUBECTL_VERBS:
        return cmd.fail(f"`kubectl {words[0] if words else ''}` is not a verb this check knows")
    verb = words[0]
    if ns != "default" and ns not in kube.namespaces:
        return cmd.fail(f"namespace {ns} is not created by k8s/ ({kube.source})")
    # Flags: each must appear in `kubectl VERB [SUB] --help`.
    help_words = tuple(words[:2]) if verb in ("rollout", "create") and len(words) > 1 else (verb,)
    if verb == "create" and len(words) > 2 and words[1] == "secret":
        help_words = tuple(words[:3])
    text = kube.help(help_words)
    if text is not None:
        for f in flags:
            if f.startswith("-") and f != "--":
                name = f.split("=", 1)[0]
                if not re.search(r"(^|[\s,])" + re.escape(name) + r"[=\s,:\[]", text, re.M):
                    cmd.fail(f"`{name}` is not a flag of `kubectl {' '.join(help_words)}`")
    flag_values = dict(f.split("=", 1) for f in flags if f.startswith("--") and "=" in f)

    def resolve(ref: str, kind: str | None = None) -> dict | None:
        if "/" in ref:
            k, name = ref.split("/", 1)
            kind = KIND_ALIASES.get(k.lower())
            if kind is None:
                cmd.fail(f"unknown resource kind `{k}`")
                return None
        else:
            name = ref
        if kind == "Pod" and name in cmd.block.pods:
            return {"kind": "Pod", "created": True}
        obj = kube.get(kind, name, ns)
        if obj is None:
            cmd.fail(f"{kind} {name} is not in namespace {ns} in {kube.source}")
        return obj

    positional = words[1:]
    if verb == "apply":
        if "-k" in flags:
            d = flags[flags.index("-k") + 1]
            if not (ROOT / d / "kustomization.yaml").is_file():
                cmd.fail(f"{d}kustomization.yaml does not exist")
        else:
            cmd.fail("only `kubectl apply -k DIR` is checked")
    elif verb == "wait":
        for ref in positional:
            obj = resolve(ref)
            cond = flag_values.get("--for", "")
            if obj and obj.get("kind") == "Job" and cond not in ("condition=complete", "condition=failed"):
                cmd.fail(f"a Job has no `{cond}`")
    elif verb == "rollout":
        if len(positional) < 2 or positional[0] not in ("status", "restart", "undo", "history", "pause", "resume"):
            return cmd.fail("kubectl rollout needs a subcommand and a resource")
        obj = resolve(positional[1])
        if obj and obj.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
            cmd.fail(f"{obj.get('kind')} cannot be rolled out")
    elif verb == "scale":
        for ref in positional:
            obj = resolve(ref)
            if obj and "--replicas" not in flag_values:
                cmd.fail("kubectl scale without --replicas")
    elif verb == "port-forward":
        if len(positional) != 2:
            return cmd.fail("kubectl port-forward takes a resource and LOCAL:REMOTE")
        obj = resolve(positional[0])
        local, _, remote = positional[1].partition(":")
        if obj:
            ports = {str(p.get("containerPort")) for c in pod_spec(obj).get("containers") or [] for p in c.get("ports") or []}
            if remote not in ports:
                cmd.fail(f"{positional[0]} has no container port {remote} ({', '.join(sorted(ports))})")
        cmd.block.forwarded_ports.add(local)
    elif verb == "run":
        if not positional:
            return cmd.fail("kubectl run without a name")
        name, image = positional[0], flag_values.get("--image")
        mounts = []
        if "--overrides" in flag_values:
            try:
                over = json.loads(flag_values["--overrides"])
            except ValueError as e:
                return cmd.fail(f"--overrides is not valid JSON ({e})")
            spec = over.get("spec", {})
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec.get("volumes", [])}
            for claim in claims.values():
                if claim and kube.get("PersistentVolumeClaim", claim, ns) is None:
                    cmd.fail(f"PersistentVolumeClaim {claim} is not in namespace {ns} in {kube.source}")
            for c in spec.get("containers", []):
                if c.get("name") != name:
                    cmd.fail(f"override container `{c.get('name')}` is not named like the pod `{name}`: kubectl would run two containers")
                if image and c.get("image") != image:
                    cmd.fail(f"override image {c.get('image')} differs from --image {image}")
                for vm in c.get("volumeMounts", []):
                    if vm.get("name") not in claims:
                        cmd.fail(f"volumeMount {vm.get('name')} has no volume")
                    mounts.append(vm.get("mountPath", ""))
        cmd.block.pods[name] = mounts
    elif verb == "exec":
        if not positional:
            return cmd.fail("kubectl exec without a pod")
        ref = positional[0]
        obj = resolve(ref if "/" in ref else "pod/" + ref)
        if obj and obj.get("created"):
            for a in tail[1:]:
                if a.startswith("/") and not any(a == m or a.startswith(m.rstrip("/") + "/") for m in cmd.block.pods[ref]):
                    cmd.fail(f"{a} is not mounted in pod {ref}")
    elif verb == "cp":
        if len(positional) != 2:
            return cmd.fail("kubectl cp takes a source and a destination")
        for p in positional:
            if ":" in p:
                pod, path = p.split(":", 1)
                obj = resolve("pod/" + pod)
                if obj and obj.get("created") and not any(path.startswith(m.rstrip("/") + "/") for m in cmd.block.pods[pod]):
                    cmd.fail(f"{path} is not mounted in pod {pod}")
            else:
                cmd.block.files.add(os.path.normpath(p))
    elif verb == "delete":
        if len(positional) == 2 and "/" not in positional[0]:
            kind = KIND_ALIASES.get(positional[0])
            if kind is None:
                return cmd.fail(f"unknown resource kind `{positional[0]}`")
            if kind == "Pod" and positional[1] in cmd.block.pods:
                return
            resolve(positional[1], kind)
        else:
            for ref in positional:
                resolve(ref)
    elif verb == "create":
        if positional[:2] == ["secret", "tls"] and len(positional) == 3:
            secret = positional[2]
            refs = json.dumps([d for d in kube.docs])
            if f'"secretName": "{secret}"' not in refs:
                cmd.fail(f"no manifest in k8s/ uses a Secret named {secret}")
        elif positional[:2] == ["secret", "generic"] and len(positional) == 3:
            # The Secret must be one an overlay mounts or reads, and each key
            # one that overlay reads. A file is one a script of ours writes
            # into certs/, unless only k8s/production/ uses the Secret: then
            # it is the operator's (a provider's CA bundle).
            secret = positional[2]
            users = {o: k for o in OVERLAYS if (k := kube.secret_keys(o, secret)) is not None}
            if not users:
                return cmd.fail(f"no manifest in {' or '.join(o + '/' for o in OVERLAYS)} uses a Secret named {secret}")
            files = [f.split("=", 1)[1] for f in flags if f.startswith("--from-file=")]
            literals = [f.split("=", 1)[1] for f in flags if f.startswith("--from-literal=")]
            if not files and not literals:
                cmd.fail("kubectl create secret generic without --from-file or --from-literal")
            known = set().union(*users.values())
            whole = any(not k for k in users.values())
            for source in files + literals:
                key = source.split("=", 1)[0] if "=" in source else os.path.basename(source)
                if not whole and key not in known:
                    cmd.fail(f"key {key} of Secret {secret} is read by no overlay (they read {', '.join(sorted(known))})")
            makers = "".join(
                (ROOT / "scripts" / m).read_text(encoding="utf-8")
                for m in ("make-cert.sh", "make-db-cert.sh")
                if (ROOT / "scripts" / m).is_file()
            )
            operator_files = set(users) == {"k8s/production"}
            for source in files:
                path = source.split("=", 1)[-1]
                if operator_files:
                    if (ROOT / path).exists() and git_tracked(path) is not None:
                        cmd.fail(f"{path} is a file of the repository, not the operator's")
                elif not path.startswith("certs/") or os.path.basename(path) not in makers:
                    cmd.fail(f"{path} is not a file scripts/make-*-cert.sh writes into certs/")
        elif positional[:1] == ["job"] and len(positional) == 2:
            src = flag_values.get("--from")
            if not src:
                cmd.fail("kubectl create job without --from")
            else:
                resolve(src)
        elif positional[:1] == ["namespace"] and len(positional) == 2:
            if positional[1] not in kube.namespaces:
                cmd.fail(f"namespace {positional[1]} is not created by {kube.source}")
        else:
            cmd.fail("only `kubectl create secret tls|generic`, `kubectl create namespace` and "
                     "`kubectl create job --from` are checked")
    else:
        for ref in positional[1:]:
            resolve(ref, KIND_ALIASES.get(positional[0]))


# ------------------------------------------------------------------ scripts

def check_script(cmd: Cmd, ctx: "Context", path: str, args: list[str], interpreter: str | None) -> None:
    rel = os.path.normpath(path)
    if not (ROOT / rel).is_file():
        return cmd.fail(f"{rel} does not exist")
    mode = git_tracked(rel)
    if mode is None:
        return cmd.fail(f"{rel} is not tracked by git")
    text = (ROOT / rel).read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    if interpreter is None and mode != "100755":
        cmd.fail(f"{rel} is run directly but is not executable in git (mode {mode})")
    if interpreter == "sh" and "bash" in first:
        cmd.fail(f"{rel} is a bash script run with sh")
    if rel.startswith("scripts/") and rel.count("/") == 1 and cmd.file == "docs/operations.md":
        listed = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
        if rel.split("/")[-1] not in listed.split("## Running")[0]:
            cmd.fail(f"{rel} is not listed in the files table of docs/operations.md")
    for a in args:
        if a.startswith("-") and a != "-":
            name = a.split("=", 1)[0]
            pattern = r"(^|[\s(|\"'])" + re.escape(name) + (r"=\*" if "=" in a else r"(\)|\s*\||\"|')")
            if not re.search(pattern, text, re.M):
                cmd.fail(f"{rel} does not handle `{name}{'=' if '=' in a else ''}`")
        elif a.startswith(("./", "/")) or a.endswith(".dump"):
            if os.path.normpath(a) not in cmd.block.files and not (ROOT / a).exists():
                cmd.fail(f"{a} is neither in the repository nor written by an earlier command of the block")
    for var, value in cmd.env.items():
        if not re.search(r"\$\{?" + var + r"\b", text):
            cmd.fail(f"{rel} does not read {var}")
        m = re.match(r"^postgres(?:ql)?://[^@]*@(127\.0\.0\.1|localhost):(\d+)/", value)
        if m and cmd.block.forwarded_ports and m.group(2) not in cmd.block.forwarded_ports:
            cmd.fail(f"port {m.group(2)} is not the local port of the port-forward above ({', '.join(sorted(cmd.block.forwarded_ports))})")


# ------------------------------------------------------------------ croupier

class Binary:
    """The debug build, its --help, and a throwaway PostgreSQL on demand."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.error = ""
        self.subcommands: set[str] = set()
        self.openapi: dict | None = None
        self.base = ""
        self.server: subprocess.Popen | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="check-docs."))

    def build(self) -> None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        try:
            p = run(["cargo", "build", "--quiet", "--bin", "croupier"], timeout=1800, cwd=ROOT)
        except (subprocess.TimeoutExpired, FileNotFoundError) as e:
            self.error = f"cargo build failed: {e}"
            return
        if p.returncode != 0:
            self.error = "cargo build --bin croupier failed: " + " ".join(p.stderr.strip().splitlines()[-3:])
            return
        self.path = (target if target.is_absolute() else ROOT / target) / "debug" / "croupier"
        h = run([str(self.path), "--help"], timeout=30)
        in_commands = False
        for line in h.stdout.splitlines():
            if line.startswith("Commands:"):
                in_commands = True
            elif in_commands and re.match(r"^  \S", line):
                self.subcommands.add(line.split()[0])
            elif in_commands and not line.strip():
                in_commands = False

    def env(self, data_dir: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "HOME", "LANG", "TMPDIR", "USER")}
        env.update(DATA_DIR=str(data_dir), RUST_LOG="warn", **extra)
        return env

    def exec(self, args: list[str], data_dir: Path, timeout: int = 60, **extra: str) -> subprocess.CompletedProcess:
        data_dir.mkdir(parents=True, exist_ok=True)
        return run([str(self.path), *args], timeout=timeout, cwd=data_dir, env=self.env(data_dir, **extra))

    def serve(self) -> str:
        """Start `serve`, wait for /readyz 200; returns an error or ''."""
        port = free_port()
        data = self.tmp / "serve"
        data.mkdir(exist_ok=True)
        self.server = subprocess.Popen(
            [str(self.path), "serve"], cwd=data, env=self.env(data, BIND="127.0.0.1", PORT=str(port)),
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "serve.log", "w"), start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                return f"serve exited with {self.server.returncode}: {(self.tmp / 'serve.log').read_text()[-300:]}"
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        with urllib.request.urlopen(self.base + "/api/openapi.json", timeout=5) as d:
                            self.openapi = json.load(d)
                        return ""
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return "/readyz did not answer 200 within 30 s"

    def stop(self) -> str:
        if not self.server:
            return ""
        proc, self.server = self.server, None
        if proc.poll() is not None:
            return f"serve had already exited with {proc.returncode}"
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return "serve did not exit within 15 s of SIGTERM"
        finally:
            kill_group(proc)
        return "" if rc == 0 else f"serve exited with {rc} after SIGTERM"

    def status(self, url: str, method: str = "GET") -> int:
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Postgres:
    """A throwaway PostgreSQL on a free loopback port, or None without initdb."""

    def __init__(self, tmp: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: [int(x) for x in re.findall(r"\d+", str(p))])
        self.bindir = bins[-1].parent if bins else None
        self.dir = tmp / "pg"
        self.port = 0
        self.started = False

    def _as(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] + argv if os.geteuid() == 0 else argv

    def start(self) -> str:
        if self.bindir is None:
            return "no /usr/lib/postgresql/*/bin/initdb"
        if os.geteuid() == 0 and run(["id", "postgres"]).returncode != 0:
            return "running as root and there is no postgres user"
        self.dir.mkdir(parents=True)
        os.chmod(self.dir.parent, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.port = free_port()
        data = self.dir / "data"
        p = run(self._as([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]), timeout=120)
        if p.returncode != 0:
            return "initdb failed: " + p.stderr[-300:]
        p = run(self._as([str(self.bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(self.dir / "log"), "-o",
                          f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} -c fsync=off",
                          "start"]), timeout=90)
        self.started = True
        if p.returncode != 0:
            return "pg_ctl start failed: " + p.stderr[-300:]
        psql = [str(self.bindir / "psql"), "-qX", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        p = run(psql + ["-c", "CREATE ROLE croupier LOGIN", "-c", "CREATE DATABASE croupier OWNER croupier"], timeout=30)
        return "" if p.returncode == 0 else "psql failed: " + p.stderr[-300:]

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                run(self._as([str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"]), timeout=60)
            except subprocess.TimeoutExpired:
                pass

    def url(self, doc_url: str) -> str:
        return re.sub(r"@[^/]+/", f"@127.0.0.1:{self.port}/", doc_url, count=1)


def check_subcommand(cmd: Cmd, ctx: "Context", args: list[str]) -> bool:
    b = ctx.binary
    if b.path is None:
        cmd.fail(b.error or "no binary")
        return False
    sub = args[0] if args else "serve"
    if sub not in b.subcommands:
        cmd.fail(f"`{sub}` is not a subcommand of croupier ({', '.join(sorted(b.subcommands))})")
        return False
    return True


def check_cli(cmd: Cmd, ctx: "Context", args: list[str]) -> None:
    """Run a croupier subcommand for real (deferred until the build)."""
    b = ctx.binary
    if not check_subcommand(cmd, ctx, args):
        return
    sub = args[0] if args else "serve"
    db_url = cmd.env.get("DATABASE_URL", "")
    try:
        if db_url.startswith(("postgres://", "postgresql://")):
            if not ctx.pg_tried:
                ctx.pg_tried = True
                ctx.pg_error = ctx.pg.start()
            if ctx.pg_error:
                ctx.notes.append(f"{cmd.where()}: `{sub}` checked against --help only ({ctx.pg_error})")
                return
            p = b.exec(args, b.tmp / f"pg-{cmd.line}", DATABASE_URL=ctx.pg.url(db_url))
            if p.returncode != 0:
                return cmd.fail(f"exit {p.returncode} against a scratch PostgreSQL: {p.stderr.strip()[-300:]}")
            if sub == "migration-status" and "pending" not in p.stdout and "applied" not in p.stdout:
                cmd.fail("migration-status listed no migration")
            else:
                ctx.notes.append(f"{cmd.where()}: `{sub}` ran against a scratch PostgreSQL ({ctx.pg.bindir.parent.name}) on 127.0.0.1:{ctx.pg.port}")
            return
        data = b.tmp / f"cli-{cmd.file.replace('/', '_')}-{cmd.line}"
        if sub == "serve":
            ctx.serve_cmds.append(cmd)  # judged once the one test instance has stopped
        elif sub == "migrate":
            p = b.exec(args, data)
            if p.returncode != 0:
                return cmd.fail(f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
            s = b.exec(["migration-status"], data)
            if "pending" in s.stdout or "applied" not in s.stdout:
                cmd.fail(f"after migrate, migration-status shows:\n{s.stdout}")
        elif sub == "migration-status":
            p = b.exec(args, data)
            if p.returncode != 0 or not p.stdout.strip():
                cmd.fail(f"exit {p.returncode}, output {p.stdout!r}: {p.stderr.strip()[-300:]}")
        elif sub == "rollback":
            m = b.exec(["migrate"], data)
            if m.returncode != 0:
                return cmd.fail(f"migrate before rollback failed: {m.stderr.strip()[-300:]}")
            p = b.exec(args, data)
            if p.returncode != 0:
                return cmd.fail(f"exit {p.returncode} on a migrated database: {p.stderr.strip()[-300:]}")
            s = b.exec(["migration-status"], data)
            if s.stdout.count("pending") != (int(args[1]) if len(args) > 1 and args[1].isdigit() else 1):
                cmd.fail(f"after {' '.join(args)}, migration-status shows:\n{s.stdout}")
        else:
            cmd.fail(f"no way to exercise `croupier {sub}` in this check")
    except subprocess.TimeoutExpired:
        cmd.fail("timed out")


def check_cargo_run(cmd: Cmd, ctx: "Context") -> None:
    argv = cmd.argv
    if argv[:2] != ["cargo", "run"]:
        return cmd.fail("only `cargo run` is checked")
    extra = argv[2:argv.index("--")] if "--" in argv else argv[2:]
    for a in extra:
        if a not in ("--release", "--quiet", "-q", "--locked"):
            return cmd.fail(f"cargo run option `{a}` is not known to this check")
    meta = ctx.cargo_meta
    if meta is not None:
        root = next((p for p in meta["packages"] if Path(p["manifest_path"]).parent == ROOT), None)
        bins = [t["name"] for t in (root or {}).get("targets", []) if "bin" in t["kind"]]
        if root is None or (len(bins) != 1 and not root.get("default_run")):
            cmd.fail(f"`cargo run` in the workspace root cannot pick a binary (root package bins: {bins})")
    ctx.deferred.append(lambda: check_cli(cmd, ctx, argv[argv.index("--") + 1:] if "--" in argv else []))


# ------------------------------------------------------------------ curl

def check_route(cmd: Cmd, ctx: "Context", method: str, path: str) -> None:
    b = ctx.binary
    if b.openapi is None:
        return cmd.fail(f"no OpenAPI document to compare with ({ctx.serve_result or b.error})")
    for template, ops in (b.openapi.get("paths") or {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            if method.lower() not in ops:
                cmd.fail(f"{path} exists but not for {method} ({', '.join(m.upper() for m in ops)})")
            return
    # Routes outside the API document (an HTML admin page): ask the instance.
    if b.base and b.status(b.base + path, method) not in (404, 405):
        return
    cmd.fail(f"{method} {path} is not a route of croupier (not in /api/openapi.json and answered 404)")


def nginx_location(path: str) -> tuple[str, bool] | None:
    """The location nginx/croupier-locations.conf picks for path, and whether it proxies."""
    text = (ROOT / "nginx/croupier-locations.conf").read_text(encoding="utf-8")
    blocks = re.findall(r"^location\s+(=\s*)?(\S+)\s*\{(.*?)^\}", text, re.M | re.S)
    exact = [(p, "croupier-proxy.conf" in body) for eq, p, body in blocks if eq and p == path]
    if exact:
        return exact[0]
    prefixes = [(p, "croupier-proxy.conf" in body) for eq, p, body in blocks
                if not eq and not p.startswith("@") and path.startswith(p)]
    return max(prefixes, key=lambda x: len(x[0])) if prefixes else None


def check_curl(cmd: Cmd, ctx: "Context") -> None:
    method, urls, args = "GET", [], cmd.argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-X", "--request"):
            method = args[i + 1]
            i += 1
        elif a in ("-d", "--data", "--json", "-H", "--header", "--cacert", "-o", "-u", "-F"):
            if a in ("-d", "--data", "--json", "-F") and method == "GET":
                method = "POST"
            i += 1
        elif a.startswith(("http://", "https://")):
            urls.append(a)
        elif a in ("-I", "--head"):
            method = "HEAD"
        elif not re.fullmatch(r"-[sSkfLvi]+|--silent|--fail|--insecure|--location|--show-error", a):
            return cmd.fail(f"curl argument `{a}` is not known to this check")
        i += 1
    if not urls:
        return cmd.fail("curl without a URL")
    for url in urls:
        m = re.match(r"^(https?)://([^/:]+)(?::(\d+))?(/[^?]*)?", url)
        scheme, host, port, path = m.group(1), m.group(2), m.group(3), m.group(4) or "/"
        port = port or ("443" if scheme == "https" else "80")
        if host not in ("localhost", "127.0.0.1", "[::1]"):
            cmd.fail(f"{host}: the docs address only the local stack")
            continue
        published = ctx.compose.published()
        service = published.get(port)
        if port == ctx.app_port:
            ctx.deferred.append(lambda p=path: check_route(cmd, ctx, method, p))
        elif service == "nginx":
            loc = nginx_location(path)
            if loc is None or not loc[1]:
                cmd.fail(f"nginx does not proxy {path} (location {loc[0] if loc else 'none'})")
            else:
                ctx.deferred.append(lambda p=path: check_route(cmd, ctx, method, p))
        elif service == "prometheus":
            flags = ctx.compose.command("prometheus")
            if path in ("/-/reload", "/-/quit"):
                if method not in ("POST", "PUT"):
                    cmd.fail(f"Prometheus answers {path} only to POST or PUT")
                if "--web.enable-lifecycle" not in flags:
                    cmd.fail(f"{path} needs --web.enable-lifecycle, which the prometheus service does not pass")
            elif not re.match(r"^/(-/(healthy|ready)|api/v1/|alerts|targets|graph)", path):
                cmd.fail(f"{path} is not a Prometheus endpoint this check knows")
        else:
            cmd.fail(f"nothing in docker-compose.yml publishes port {port}")


# ------------------------------------------------------------------ dispatch

class Context:
    def __init__(self) -> None:
        self.compose = Compose()
        self.kube = Kube()
        self.binary = Binary()
        self.pg = Postgres(self.binary.tmp)
        self.pg_tried = False
        self.pg_error = ""
        self.serve_result = "serve not run"
        self.serve_cmds: list[Cmd] = []
        self.deferred: list = []
        self.notes: list[str] = []
        dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        m = re.search(r"\bPORT=(\d+)", dockerfile)
        self.app_port = m.group(1) if m else "8080"
        try:
            p = run(["cargo", "metadata", "--no-deps", "--format-version", "1"], timeout=120, cwd=ROOT)
            self.cargo_meta = json.loads(p.stdout) if p.returncode == 0 else None
        except (FileNotFoundError, subprocess.TimeoutExpired, ValueError):
            self.cargo_meta = None


def dispatch(cmd: Cmd, ctx: Context) -> None:
    argv = cmd.argv
    if argv[0] in STRUCTURE_ONLY:
        cmd.kind = "shell structure"
        return
    if argv[:2] == ["docker", "compose"]:
        cmd.kind = "docker compose"
        check_compose(cmd, ctx)
    elif argv[0] == "kubectl":
        cmd.kind = "kubectl"
        check_kubectl(cmd, ctx)
    elif argv[0] in ("bash", "sh") and len(argv) > 1 and argv[1].startswith(("scripts/", "./scripts/")):
        cmd.kind = "script"
        check_script(cmd, ctx, argv[1], argv[2:], argv[0])
    elif argv[0].startswith(("scripts/", "./scripts/")):
        cmd.kind = "script"
        check_script(cmd, ctx, argv[0], argv[1:], None)
    elif argv[0] == "croupier":
        cmd.kind = "croupier"
        ctx.deferred.append(lambda: check_cli(cmd, ctx, argv[1:]))
    elif argv[0] == "cargo":
        cmd.kind = "croupier"
        check_cargo_run(cmd, ctx)
    elif argv[0] == "curl":
        cmd.kind = "curl"
        check_curl(cmd, ctx)
    elif argv[0] == "promtool":
        cmd.kind = "promtool"
        files = [a for a in argv[1:] if a.endswith((".yml", ".yaml"))]
        missing = [f for f in files if not (ROOT / f).is_file()]
        if argv[1:3] not in (["test", "rules"], ["check", "rules"], ["check", "config"]) or not files or missing:
            cmd.fail(f"not a promtool check of existing files ({', '.join(missing) or 'none given'})")
        elif shutil.which("promtool"):
            p = run(argv, timeout=120, cwd=ROOT)
            if p.returncode != 0:
                cmd.fail(f"exit {p.returncode}: {(p.stdout + p.stderr).strip()[-300:]}")
        else:
            ctx.notes.append(f"{cmd.where()}: promtool not installed; files exist")
    elif argv[:2] == ["openssl", "rand"]:
        cmd.kind = "openssl"
        p = run(argv, timeout=30)
        if p.returncode != 0 or len(p.stdout.strip()) < 64:
            cmd.fail(f"does not print 32 bytes or more: {p.stdout.strip()!r} {p.stderr.strip()}")
    elif argv[0] == "cp" and len(argv) == 3:
        cmd.kind = "other"
        src, dst = argv[1], argv[2]
        if not (ROOT / src).is_file() or git_tracked(src) is None:
            cmd.fail(f"{src} is not a tracked file")
        if run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", dst]).returncode != 0:
            cmd.fail(f"{dst} is not ignored by git: secrets would be committed")
    else:
        cmd.kind = "other"
        joined = " ".join(argv)
        if not any(re.fullmatch(rx, joined) for rx, _ in ALLOWED):
            cmd.fail("unknown command form: add a check for it to scripts/check-docs.py or an ALLOWED entry with a reason")


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the finally below stops what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ctx = Context()
    try:
        return check_all(ctx)
    finally:
        ctx.binary.stop()
        ctx.pg.stop()
        shutil.rmtree(ctx.binary.tmp, ignore_errors=True)


def check_all(ctx: Context) -> int:
    commands: list[Cmd] = []
    loop_header = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    blocks, inline = extract(), extract_inline()
    for file, line, text, tokens, background, block in blocks + inline:
        env = {}
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            k, v = tokens.pop(0).split("=", 1)
            env[k] = v
        while tokens and tokens[0] in STRUCTURE_PREFIX:
            tokens.pop(0)
        if not tokens:
            continue
        if tokens[0] == "for" and len(tokens) >= 3 and loop_header.match(tokens[1]) and tokens[2] == "in":
            block.loop_vars[tokens[1]] = tokens[3:]
            KINDS["shell structure"] += 1
            continue
        variants = [{}]
        for var, values in block.loop_vars.items():
            if any(re.search(r"\$\{?" + var + r"\b", t) for t in tokens):
                variants = [dict(v, **{var: val}) for v in variants for val in values]
        for values in variants:
            argv = [expand(t, values) for t in tokens]
            cmd = Cmd(file, line, text, argv, env, block)
            before = len(FAILURES)
            dispatch(cmd, ctx)
            if len(FAILURES) > before and len(variants) > 1:
                del FAILURES[before + 1:]
        KINDS[cmd.kind] += 1
        commands.append(cmd)

    ctx.binary.build()
    if ctx.binary.path:
        ctx.serve_result = ctx.binary.serve()
        if not ctx.serve_result:
            for cmd_fn in ctx.deferred:
                cmd_fn()
            ctx.deferred = []
            ctx.serve_result = ctx.binary.stop()
    for cmd_fn in ctx.deferred:
        cmd_fn()
    for cmd in ctx.serve_cmds:
        if ctx.serve_result:
            cmd.fail(f"serve: {ctx.serve_result}")
    ctx.pg.stop()

    seen = sorted(set(FAILURES), key=lambda f: (DOCS.index(f.split(":")[0]) if f.split(":")[0] in DOCS else 9,
                                                 int(f.split(":")[1]) if f.split(":")[1].isdigit() else 0))
    for f in seen:
        print(f"FAIL {f}")
    if ctx.kube.kubectl is None:
        ctx.notes.append("kubectl not found: kubectl flags were not checked against `kubectl VERB --help`")
    for n in ctx.notes:
        print(f"note {n}")
    total = sum(v for k, v in KINDS.items() if k != "shell structure")
    by_kind = ", ".join(f"{v} {k}" for k, v in sorted(KINDS.items()))
    print(f"check-docs: {total} commands checked ({by_kind}), {len(inline)} of them quoted in prose; "
          f"services from {ctx.compose.source}, resources from {ctx.kube.source}; {len(seen)} failed")
    return 1 if seen else 0


if __name__ == "__main__":
    sys.exit(main())
