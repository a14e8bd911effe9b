"""s3config without a server: what reading a marketplace's S3 settings registers for masking."""

from __future__ import annotations

from onemarket import driverlog
from onemarket.action import Market
from onemarket.markets import load_market
from onemarket.s3config import S3Settings


def test_reading_the_settings_masks_the_key_id_and_the_secret() -> None:
    """Every user of the settings (actions, the downloader, one-market, the mirror) gets both
    masked, not only one-market; the key id as the client sends it (stripped)."""
    key, secret = "AKIDMASKEDBYSETTINGS01", "secretMaskedBySettings000000000000000001"
    attrs = {"ACCESS_KEY_ID": f" {key} ", "SECRET_ACCESS_KEY": secret, "REGION": "r"}
    S3Settings.from_market(Market(1, "cfg", "s3", attrs), need_bucket=False)
    assert driverlog.scrub(f"Credential={key}/x {secret}") == "Credential=****/x ****"


def test_loading_a_market_masks_its_secrets_before_any_use(tmp_path) -> None:
    """one-market push through oned reads the keys from oned's template without building S3
    settings: loading the market already masks what its driver declares secret."""
    key, secret = "AKIDMASKEDBYLOADING01", "secretMaskedByLoading0000000000000000001"
    path = tmp_path / "m.tmpl"
    path.write_text(
        f'NAME="m"\nMARKET_MAD="s3"\nACCESS_KEY_ID="{key}"\nSECRET_ACCESS_KEY="{secret}"\n'
    )
    load_market(str(path))
    assert driverlog.scrub(f"{key} {secret}") == "**** ****"
