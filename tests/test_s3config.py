"""s3config without a server: what reading a marketplace's S3 settings registers for masking."""

from __future__ import annotations

from onemarket import driverlog
from onemarket.action import Market
from onemarket.s3config import S3Settings


def test_reading_the_settings_masks_the_key_id_and_the_secret() -> None:
    """Every user of the settings (actions, the downloader, one-market, the mirror) gets both
    masked, not only one-market; the key id as the client sends it (stripped)."""
    key, secret = "AKIDMASKEDBYSETTINGS01", "secretMaskedBySettings000000000000000001"
    attrs = {"ACCESS_KEY_ID": f" {key} ", "SECRET_ACCESS_KEY": secret, "REGION": "r"}
    S3Settings.from_market(Market(1, "cfg", "s3", attrs), need_bucket=False)
    assert driverlog.scrub(f"Credential={key}/x {secret}") == "Credential=****/x ****"
