"""The site file's ``[tls]`` table (``cdp.msa.config``) and what it means for the files.

``[tls] mode = "on"``: ``cdp install`` keeps the site CA and a certificate per server in
``TlsSpec.dir`` (``cdp.pki``, FORMAT.md §20); each DRVA's configuration names its
certificate and key, the API serves ``api.pem``, and every client trusts ``ca.pem`` only.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp.errors import ConfigError
from cdp.pki_files import LeafSpec, TlsFiles, server_names
from cdp.tls import SERVER_NAME, SERVER_NAME_EXPECTED, server_context
from cdp.tomlread import Endpoint, TomlReader

if TYPE_CHECKING:
    from cdp.msa.config import DrvaSpec

TLS_MODES = ("off", "on")
TLS_SERVER_NAMES_MAX = 64
API_STEM = "api"  # the REST API's certificate and key: <tls dir>/api.pem, api.key


@dataclass(frozen=True)
class TlsSpec:
    """``[tls] mode = "on"``: where the site's CA and certificates are (``cdp.pki``) and
    the extra names its servers' certificates hold."""

    dir: Path
    server_names: tuple[str, ...] = ()

    @property
    def files(self) -> TlsFiles:
        return TlsFiles(self.dir)

    @property
    def ca_cert(self) -> Path:
        return self.files.ca_cert

    def drva_stem(self, drva: DrvaSpec) -> str:
        return f"drva-{drva.name}"

    def drva_leaf(self, drva: DrvaSpec) -> LeafSpec:
        # The DRVA's name too: a filter that dials it by another address may ask for it.
        return LeafSpec(self.drva_stem(drva), drva.name,
                        server_names(drva.listen.host, extra=(*self.server_names, drva.name)))

    def api_leaf(self, api: Endpoint) -> LeafSpec:
        return LeafSpec(API_STEM, "cdp-api", server_names(api.host, extra=self.server_names))

    @property
    def api_cert(self) -> Path:
        return self.files.cert(API_STEM)

    @property
    def api_key(self) -> Path:
        return self.files.key(API_STEM)

    def check_files(self, drvas: Collection[DrvaSpec], source: Path) -> None:
        """Load every server's certificate and key as the DRVAs and the API will: a
        missing or bad file is a ``ConfigError`` naming it, before anything starts."""
        pairs = [(self.files.cert(self.drva_stem(d)), self.files.key(self.drva_stem(d))) for d in drvas]
        for cert, key in [*pairs, (self.api_cert, self.api_key)]:
            try:
                server_context(cert, key)
            except ConfigError as exc:
                raise ConfigError(f"{source}: tls.mode is on, but {exc.message} (cdp install makes the site's "
                                  f"certificates)") from None


def parse_tls(r: TomlReader, value: Any, here: Path, state_dir: Path) -> TlsSpec | None:
    """The site file's ``[tls]`` table: None when TLS is off (the default); ``dir`` is
    relative to the site file's directory ``here``, by default ``<state_dir>/tls``."""
    t = r.table(value, "tls", set(), {"mode", "dir", "server_names"})
    mode = t.get("mode", "off")
    if mode not in TLS_MODES:
        r.fail("tls.mode", f"one of {', '.join(TLS_MODES)}", mode)
    if mode == "off":
        return None
    tls_dir = t.get("dir")
    if tls_dir is not None:
        r.file_path(tls_dir, "tls.dir")
    listed = r.list(t.get("server_names", []), "tls.server_names", nonempty=False)
    if len(listed) > TLS_SERVER_NAMES_MAX:
        r.fail("tls.server_names", f"at most {TLS_SERVER_NAMES_MAX} names", len(listed))
    names: list[str] = []
    for i, name in enumerate(listed):
        if not isinstance(name, str) or not SERVER_NAME.fullmatch(name) or name in names:
            r.fail(f"tls.server_names[{i}]", f"{SERVER_NAME_EXPECTED}, not listed twice", name)
        names.append(name)
    return TlsSpec(here / tls_dir if tls_dir is not None else state_dir / "tls", tuple(names))
