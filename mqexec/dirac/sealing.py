"""Sealed delivery between a submitter and its DIRAC jobs: proxy chains, sealing to a public key, signing.

The key service answers a job's *hello* (its delegated proxy chain and a fresh nonce) with a *reply*: a payload
sealed to the hello's proxy key and signed by the submitter's own proxy key::

    hello = {"nonce": n, "chain": job.pems()}                    # the job: Identity.load() of $X509_USER_PROXY
    reply = answer_hello(hello, me, ca_dir, {"MQEXEC_SECRET": "..."})   # the submitter: checks the chain is mine
    open_reply(reply, job, ca_dir, n)                            # the job: checks the signer is the same person

Sealing: RSA keys get an OAEP-wrapped AES-256-GCM key, EC keys an ephemeral ECDH + HKDF one; the nonce is the
associated data, so a reply opens only for the hello it answers. Which certificates are proxies is decided by
:func:`dirac_submit.proxy.is_proxy` (RFC 3820, the GSI draft, legacy ``CN=proxy``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import MQExecError

_KDF_INFO = b"mqexec-dirac-boot-v1"


class BootError(MQExecError):
    """A job could not get its sealed credentials, or a hello/reply failed a check."""


class Identity:
    """A proxy file: its certificate chain (proxy first) and private key.

    >>> me = Identity.load("/tmp/x509up_u1000")          # doctest: +SKIP
    >>> me.user.subject.rfc4514_string()                 # doctest: +SKIP
    'CN=alice,O=mqexec-test'
    """

    def __init__(self, chain: list[Any], key: Any) -> None:
        self.chain, self.key = chain, key

    @classmethod
    def load(cls, path: str | None = None) -> Identity:
        """Read and check ``path`` (default ``$X509_USER_PROXY``, then ``/tmp/x509up_u<uid>``).

        Raises:
            dirac_submit.ProxyError: missing, unreadable or expired (with the ``dirac-proxy-init`` that fixes it).
            BootError: the file holds no private key.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from dirac_submit.proxy import load_proxy

        proxy = load_proxy(path)
        data = Path(proxy.path).read_bytes()
        block = re.search(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", data, re.DOTALL)
        if block is None:
            raise BootError(f"the proxy file {proxy.path} holds no private key")
        chain = x509.load_pem_x509_certificates(data)
        return cls(chain, serialization.load_pem_private_key(block.group(0), password=None))

    @property
    def user(self) -> Any:
        """The end-entity (non-proxy) certificate: the person."""
        return _person(self.chain)

    def pems(self) -> list[str]:
        """The chain as PEM texts, proxy first."""
        from cryptography.hazmat.primitives import serialization

        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain]


def _person(chain: list[Any]) -> Any:
    from dirac_submit.proxy import end_entity

    user = end_entity(chain)
    if user is None:
        raise BootError("the certificate chain has no end-entity (user) certificate")
    return user


def verify_chain(pems: Sequence[str], user: Any, ca_dir: str) -> Any:
    """Check a proxy chain presented by the other side; return its leaf certificate.

    Every proxy must be signed by the next certificate and be within its validity period, the end-entity
    certificate must have the same subject as ``user`` (our own) and be issued by a CA in ``ca_dir``.
    """
    from cryptography import x509

    from dirac_submit.proxy import is_proxy

    try:
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    except (ValueError, TypeError, AttributeError) as exc:
        raise BootError(f"unreadable certificate chain: {exc}") from None
    if not chain:
        raise BootError("empty certificate chain")
    now = datetime.now(UTC)
    for i, cert in enumerate(chain):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise BootError(f"certificate {cert.subject.rfc4514_string()} is not valid now")
        if not is_proxy(cert):
            break
        if i + 1 == len(chain):
            raise BootError("proxy chain ends without the user's certificate")
        try:
            cert.verify_directly_issued_by(chain[i + 1])
        except Exception as exc:  # InvalidSignature, or a name/key-type mismatch (ValueError, TypeError)
            raise BootError(
                f"proxy {cert.subject.rfc4514_string()} is not signed by the next certificate: "
                f"{exc or type(exc).__name__}"
            ) from None
    ee = _person(chain)
    if ee.subject != user.subject:
        raise BootError(f"chain belongs to {ee.subject.rfc4514_string()}, not to {user.subject.rfc4514_string()}")
    for ca in _cas(ca_dir):
        if ca.subject == ee.issuer and ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            try:
                ee.verify_directly_issued_by(ca)
                return chain[0]
            except Exception:  # another CA with the same name; keep looking
                continue
    raise BootError(f"no CA in {ca_dir} issued {ee.subject.rfc4514_string()}")


_CA_CACHE: dict[str, list[Any]] = {}


def _cas(ca_dir: str) -> list[Any]:
    from cryptography import x509

    if ca_dir not in _CA_CACHE:
        files = [Path(ca_dir)] if os.path.isfile(ca_dir) else sorted(Path(ca_dir).glob("*"))
        found = []
        for path in files:
            if path.suffix in (".pem", ".crt") or re.fullmatch(r"[0-9a-f]{8}\.\d+", path.name):
                with contextlib.suppress(OSError, ValueError):
                    found += x509.load_pem_x509_certificates(path.read_bytes())
        _CA_CACHE[ca_dir] = found
    return _CA_CACHE[ca_dir]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal(public_key: Any, plaintext: bytes, aad: bytes) -> dict[str, str]:
    """Encrypt for the holder of ``public_key`` (RSA: OAEP-wrapped key; EC: ephemeral ECDH) with AES-256-GCM."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if isinstance(public_key, rsa.RSAPublicKey):
        key = AESGCM.generate_key(256)
        wrapped = public_key.encrypt(key, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        alg = "rsa-oaep"
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public_key.curve)
        shared = ephemeral.exchange(ec.ECDH(), public_key)
        key = HKDF(hashes.SHA256(), 32, None, _KDF_INFO).derive(shared)
        wrapped = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        alg = "ecdh"
    else:
        raise BootError(f"cannot seal to a {type(public_key).__name__}")
    iv = secrets.token_bytes(12)
    return {"alg": alg, "key": _b64(wrapped), "iv": _b64(iv), "ct": _b64(AESGCM(key).encrypt(iv, plaintext, aad))}


def unseal(private_key: Any, sealed: Mapping[str, str], aad: bytes) -> bytes:
    """Undo :func:`seal` with the matching private key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    wrapped = base64.b64decode(sealed["key"])
    if sealed["alg"] == "rsa-oaep":
        key = private_key.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    else:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, wrapped)
        key = HKDF(hashes.SHA256(), 32, None, _KDF_INFO).derive(private_key.exchange(ec.ECDH(), peer))
    return AESGCM(key).decrypt(base64.b64decode(sealed["iv"]), base64.b64decode(sealed["ct"]), aad)


def _sign(private_key: Any, data: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        return _b64(
            private_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())
        )
    return _b64(private_key.sign(data, ec.ECDSA(hashes.SHA256())))


def _verify_signature(public_key: Any, data: bytes, signature: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(
                base64.b64decode(signature),
                data,
                padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                hashes.SHA256(),
            )
        else:
            public_key.verify(base64.b64decode(signature), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise BootError(f"the reply's signature does not verify ({type(exc).__name__})") from None


def _signed_part(nonce: str, sealed: Mapping[str, str]) -> bytes:
    return json.dumps({"nonce": nonce, "sealed": dict(sealed)}, sort_keys=True).encode()


def answer_hello(hello: Mapping[str, Any], me: Identity, ca_dir: str, payload: Mapping[str, str]) -> dict[str, Any]:
    """The key service's reply to one hello: ``payload`` sealed to the hello's proxy and signed by ``me``.

    Raises:
        BootError: the hello's chain is not a valid proxy of the same person as ``me``.
    """
    nonce = str(hello["nonce"])
    leaf = verify_chain(hello["chain"], me.user, ca_dir)
    sealed = seal(leaf.public_key(), json.dumps(dict(payload)).encode(), nonce.encode())
    return {"v": 1, "chain": me.pems(), "sealed": sealed, "sig": _sign(me.key, _signed_part(nonce, sealed))}


def open_reply(reply: Mapping[str, Any], me: Identity, ca_dir: str, nonce: str) -> dict[str, str]:
    """Check a reply (signed by a proxy of the same person as ``me``) and unseal it."""
    if "error" in reply:
        raise BootError(f"the key service refused: {reply['error']}")
    leaf = verify_chain(reply["chain"], me.user, ca_dir)
    _verify_signature(leaf.public_key(), _signed_part(nonce, reply["sealed"]), reply["sig"])
    try:
        return dict(json.loads(unseal(me.key, reply["sealed"], nonce.encode())))
    except Exception as exc:
        raise BootError(f"cannot unseal the reply with this job's proxy key ({type(exc).__name__})") from None
