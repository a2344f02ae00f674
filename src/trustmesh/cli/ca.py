"""``trustmesh ca``: issue, revoke, show and audit certificates of the private CA."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import click

from trustmesh.cli._client import AdminClient, socket_option
from trustmesh.cli._output import emit_json, fail, output_option
from trustmesh.errors import InvalidInput, TrustmeshError
from trustmesh.pki.templates import TEMPLATES


@click.group()
def ca() -> None:
    """Issue, revoke and inspect certificates of the private CA."""


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field="csr") from None


@ca.command("issue")
@click.option("--csr", "csr_path", required=True, metavar="FILE",
              help="PKCS#10 request, PEM or DER ('-' for stdin).")
@click.option("--template", "-t", required=True, type=click.Choice(sorted(TEMPLATES)),
              help="Certificate profile.")
@click.option("--validity", help="Lifetime such as 24h, 30d  [default: server's, 24h]")
@click.option("--dns-name", "dns_names", multiple=True, help="Extra DNS SAN (repeatable).")
@click.option("--uri", "uris", multiple=True, help="Extra URI SAN (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="Extra IP SAN (repeatable).")
@click.option("--path-length", type=int, help="subordinate-ca: pathLenConstraint  [default: 0]")
@click.option("--idempotency-key",
              help="Retrying with the same key returns the same certificate.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the chain (leaf first) to this file instead of stdout.")
@socket_option
@output_option()
def issue(csr_path: str, template: str, validity: str | None, dns_names: tuple[str, ...],
          uris: tuple[str, ...], ip_addresses: tuple[str, ...], path_length: int | None,
          idempotency_key: str | None, out_path: Path | None, socket_path: Path | None,
          output: str) -> None:
    """Issue a certificate from a CSR and print the chain, leaf first.

    \b
    Example:
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \\
          -keyout web.key -subj /CN=web.internal -out web.csr
      trustmesh ca issue --csr web.csr --template end-entity-server \\
          --dns-name web.internal --validity 720h > web-chain.pem
    """
    try:
        csr = _read_input(csr_path)
        try:
            csr_text = csr.decode("ascii")
        except UnicodeDecodeError:
            import base64

            b64 = base64.encodebytes(csr).decode()
            csr_text = (f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}"
                        "-----END CERTIFICATE REQUEST-----\n")
        body: dict[str, Any] = {
            "csr": csr_text, "template": template, "dns_names": list(dns_names),
            "uris": list(uris), "ip_addresses": list(ip_addresses),
        }
        if validity:
            body["validity"] = validity
        if path_length is not None:
            body["path_length"] = path_length
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        result = AdminClient(socket_path).request("POST", "/v1/certificates", json=body)
    except TrustmeshError as err:
        fail(err, output)
        return
    if out_path:
        out_path.write_text(result["chain_pem"])
    if output == "json":
        emit_json(result)
    elif not out_path:
        click.echo(result["chain_pem"], nl=False)
    else:
        click.echo(f"issued serial {result['serial']} -> {out_path}", err=True)


@ca.command("revoke")
@click.option("--serial", required=True, help="Serial number in hex (colons allowed).")
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason: key-compromise, ca-compromise, affiliation-changed, "
                   "superseded, cessation-of-operation, certificate-hold, "
                   "privilege-withdrawn, aa-compromise, unspecified.")
@socket_option
@output_option()
def revoke(serial: str, reason: str, socket_path: Path | None, output: str) -> None:
    """Revoke a certificate: the CRL is re-signed and OCSP answers 'revoked' at once."""
    try:
        result = AdminClient(socket_path).request(
            "POST", f"/v1/certificates/{serial}/revoke", json={"reason": reason})
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(result)
    else:
        click.echo(f"revoked {result['serial']} (reason {result['reason']})")


@ca.command("show")
@click.option("--pem", is_flag=True, help="Also print the certificates in PEM.")
@socket_option
@output_option()
def show(pem: bool, socket_path: Path | None, output: str) -> None:
    """Print the CA slots (prepared, active, old), the active chain with fingerprints,
    and where CRL and OCSP are served."""
    try:
        info = AdminClient(socket_path).request("GET", "/v1/ca")
    except TrustmeshError as err:
        fail(err, output)
        return
    if output == "json":
        emit_json(info)
        return
    click.echo(f"trust domain: {info['trust_domain']}  mode: {info['mode']}  "
               f"key manager: {info['key_manager']}")
    click.echo(f"CRL:  {info['crl_url']}")
    click.echo(f"OCSP: {info['ocsp_url']}")
    _show_slots(info)
    for cert in [*info["chain"], info["ocsp_responder"]]:
        click.echo("")
        click.echo(f"[{cert['role']}] {cert['subject']}")
        click.echo(f"  issuer:   {cert['issuer']}")
        click.echo(f"  serial:   {cert['serial']}")
        click.echo(f"  valid:    {cert['not_before']} .. {cert['not_after']}")
        click.echo(f"  sha256:   {cert['fingerprint_sha256']}")
        if pem:
            click.echo(cert["pem"], nl=False)


def _when(text: str) -> str:
    """An ISO time without the fraction of a second (plenty for reading a schedule)."""
    head, dot, tail = text.partition(".")
    if not dot:
        return text
    zone = next((i for i, c in enumerate(tail) if c in "+-Z"), len(tail))
    return head + tail[zone:]


def _show_slots(info: dict[str, Any]) -> None:
    slots = info.get("slots") or []
    rotation = info.get("rotation") or {}
    click.echo("")
    click.echo(f"CA slots (propagation {rotation.get('propagation_seconds', 0):g}s; "
               "the next CA is published at 1/2 of the active one's life, signs at 5/6):")
    for slot in slots:
        root = slot["chain"][-1]
        state = slot["state"]
        if state == "active":
            plan = (f"next CA prepared at {_when(slot['prepare_next_at'])}, "
                    f"signs from {_when(slot['activate_next_at'])}")
        elif state == "prepared":
            plan = f"signs from {_when(slot['signs_from'])}"
        else:
            plan = (f"retires at {_when(slot['retire_at'])}" if slot.get("retire_at")
                    else "retires when what it signed has expired")
        click.echo(f"  {state:8}  {slot['ca_id']}  until {_when(slot['not_after'])}  {plan}")
        click.echo(f"            {'upstream' if slot['upstream'] else 'root'}: "
                   f"{root['subject']}  sha256 {root['fingerprint_sha256']}")


_AUDIT_COLUMNS = ["id", "at", "actor", "action", "serial", "subject", "sans", "template",
                  "not_before", "not_after", "reason"]


@ca.command("audit")
@click.option("--action", type=click.Choice(["issue", "revoke"]), help="Only this action.")
@click.option("--serial", help="Only events of this serial.")
@socket_option
@output_option("text", "json", "csv")
def audit(action: str | None, serial: str | None, socket_path: Path | None,
          output: str) -> None:
    """Every issuance and revocation: when, by whom, what."""
    params = {k: v for k, v in (("action", action), ("serial", serial)) if v}
    try:
        events = AdminClient(socket_path).request("GET", "/v1/audit", params=params)["events"]
    except TrustmeshError as err:
        fail(err, "json" if output == "json" else "text")
        return
    if output == "json":
        emit_json(events)
        return
    if output == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_AUDIT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for ev in events:
            writer.writerow({**ev, "sans": " ".join(ev.get("sans") or [])})
        click.echo(buf.getvalue(), nl=False)
        return
    for ev in events:
        extra = ev.get("reason") or ev.get("template") or ""
        click.echo(f"{ev['at']}  {ev['action']:6}  {ev['serial']}  {ev['actor']}  "
                   f"{ev.get('subject', '')}  {extra}")
