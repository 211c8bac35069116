"""The deployment's message secret, and the signer every broker of this process signs and
verifies with (contracts/message_signature.py says how)."""

from __future__ import annotations

import logging

from contracts.message_signature import MessageSigner
from contracts.settings import Settings
from stages.kit.secret_file import kept_secret

log = logging.getLogger(__name__)

SECRET_FILE = "message.secret"
SETTING = "SLUICE_MESSAGE_SECRET"


def message_secret(settings: Settings) -> str:
    """`SLUICE_MESSAGE_SECRET`, else the one kept under the data dir (made on first use, so
    every process of one `sluice up` shares it)."""
    if settings.message_secret:
        return settings.message_secret
    if settings.job_store_url or settings.blob_store_url:
        # Shared stores mean several machines; each would make a secret of its own, and
        # every message between them would be dead-lettered as unauthenticated.
        log.warning(
            "%s is not set: signing messages with the secret kept in %s, which processes "
            "on other machines do not share; set the same value on every one of them",
            SETTING,
            settings.data_dir / SECRET_FILE,
        )
    return kept_secret(settings.data_dir / SECRET_FILE, setting=SETTING)


def signer_of(settings: Settings) -> MessageSigner:
    """The signer for this deployment's messages."""
    return MessageSigner(message_secret(settings))
