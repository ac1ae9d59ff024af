"""`fabricq.sysmem.import_without`: a module imported while an optional package looks absent to
it, the package importable again afterwards; and Lightning Fabric, as `python -m fabricq` imports
it, without torchmetrics, matplotlib and scipy in the process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fabricq.sysmem import import_without


def test_the_optional_package_looks_absent_during_the_import_only(tmp_path, monkeypatch):
    (tmp_path / "optional_extra.py").write_text("VALUE = 42\n")
    (tmp_path / "uses_extra.py").write_text(textwrap.dedent("""
        try:
            import optional_extra
            HAS_EXTRA = True
        except ImportError:
            HAS_EXTRA = False
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("optional_extra", "uses_extra"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = import_without("uses_extra", ("optional_extra",))
    assert module.HAS_EXTRA is False
    assert "optional_extra" not in sys.modules  # no None entry left behind
    import optional_extra  # importable again

    assert optional_extra.VALUE == 42


def test_an_optional_package_already_imported_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "optional_extra2.py").write_text("VALUE = 1\n")
    (tmp_path / "uses_extra2.py").write_text("import optional_extra2\nHAS_EXTRA = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import optional_extra2  # noqa: F401

    assert import_without("uses_extra2", ("optional_extra2",)).HAS_EXTRA is True
    assert sys.modules["optional_extra2"] is not None
    for name in ("optional_extra2", "uses_extra2"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_fabric_and_a_model_without_unused_libraries():
    """What `python -m fabricq` does before it launches ranks, in a fresh interpreter: Fabric and
    a transformers model work, and neither torchmetrics, matplotlib nor scipy was imported."""
    script = textwrap.dedent("""
        import json, sys
        from fabricq.sysmem import import_without
        import_without("lightning_fabric", ("torchmetrics",))
        import_without("transformers.modeling_utils", ("scipy",))
        from fabricq.runtime import make_strategy  # what fabricq.runtime.launch imports
        from lightning_fabric import Fabric
        from transformers import LlamaConfig, LlamaForCausalLM
        fabric = Fabric(accelerator="cpu", devices=1)
        fabric.launch()
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=32))
        loaded = [m for m in ("torchmetrics", "matplotlib", "lightning.pytorch", "scipy") if m in sys.modules]
        print(json.dumps({"loaded": loaded, "world": fabric.world_size}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"loaded": [], "world": 1}


def test_a_module_that_needs_the_package_after_all_gets_it(tmp_path, monkeypatch):
    (tmp_path / "needed_extra.py").write_text("VALUE = 7\n")
    (tmp_path / "needs_extra.py").write_text("import needed_extra\nVALUE = needed_extra.VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("needed_extra", "needs_extra"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert import_without("needs_extra", ("needed_extra",)).VALUE == 7
    assert sys.modules["needed_extra"] is not None
