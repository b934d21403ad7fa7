"""The agent bundle builder lives on the CDK side (``spotguard_cdk.bundle``); this thin
re-export keeps ``python -m spotguard_tools.bundle build DIR`` and the tests' imports."""

from __future__ import annotations

from spotguard_cdk.bundle import (
    BUNDLE_NAME,
    CORE_FILES,
    CORE_PACKAGE,
    FIXED_MTIME,
    INSTANCE_ASSETS,
    BundleInfo,
    build_bundle,
    bundle_bytes,
    bundle_entries,
    main,
    render_user_data,
    template_placeholders,
    user_data_template,
)

__all__ = [
    "BUNDLE_NAME",
    "CORE_FILES",
    "CORE_PACKAGE",
    "FIXED_MTIME",
    "INSTANCE_ASSETS",
    "BundleInfo",
    "build_bundle",
    "bundle_bytes",
    "bundle_entries",
    "main",
    "render_user_data",
    "template_placeholders",
    "user_data_template",
]

if __name__ == "__main__":
    raise SystemExit(main())
