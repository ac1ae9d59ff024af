"""The config schema (fabricq/config.py) and the command line's handling of config errors: every
field typed strictly, unknown and removed keys refused, rules between fields, recipes in all three
spellings, and Hydra's own errors as one `fabricq: error:` line with exit code 2."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest

from conftest import REPO_ROOT
from in_process import compose_config
from fabricq.config import REMOVED, Settings, load_settings
from fabricq.errors import FabricqError

RECIPES = {  # written out here, independently of conf/quant: (method, bits, group_size, symmetric, actorder)
    "gptq_w4": ("gptq", 4, 128, True, "static"),
    "gptq_w3": ("gptq", 3, 128, True, "static"),
    "gptq_w4_asym": ("gptq", 4, 128, False, "static"),
    "gptq_w8": ("gptq", 8, -1, True, "static"),
    "rtn_w4": ("rtn", 4, 128, True, "none"),
}
QUANT_NAMES = "method, bits, group_size, symmetric, actorder, damp, block_size, hessian_dtype, true_sequential, ignore"


def settings(*overrides: str, environ=None) -> Settings:
    return load_settings(compose_config(*overrides), environ={} if environ is None else environ)


def refused(*overrides: str, environ=None) -> str:
    with pytest.raises(FabricqError) as info:
        settings(*overrides, environ=environ)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# The schema and the YAML files
# ------------------------------------------------------------------------------------------------


def test_yaml_defaults_equal_the_schema_defaults():
    assert settings() == Settings()


def test_every_config_group_option_loads():
    """Each file under conf/<group>/ composes and passes the schema (no field the schema lacks)."""
    options = [(d.name, f.stem) for d in sorted((REPO_ROOT / "conf").iterdir()) if d.is_dir() and d.name != "recipe"
               for f in sorted(d.glob("*.yaml"))]
    assert ("quant", "gptq_w8") in options and ("distributed", "default") in options
    for group, option in options:
        optional = group == "recovery"  # not in the defaults list: appended with +
        settings(f"{'+' if optional else ''}{group}={option}")


def test_settings_are_typed_and_frozen():
    s = settings("quant.ignore=['.*lm_head']", "distributed.timeout_s=30")
    assert s.quant.ignore == (".*lm_head",) and s.distributed.timeout_s == 30
    assert s.trainer.world_size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.quant.bits = 3


def test_constants_agree_with_the_modules_that_use_them():
    from fabricq import config
    from fabricq.models import DTYPES
    from fabricq.quant.grid import ACTORDERS, SUPPORTED_BITS

    assert config.SUPPORTED_BITS == SUPPORTED_BITS and config.ACTORDERS == ACTORDERS
    assert set(config.MODEL_DTYPES) == set(DTYPES)


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_spellings_select_the_same_quant_entry(name):
    expected = RECIPES[name]
    for spelling in (f"recipe={name}", f"+recipe={name}", f"quant={name}"):
        q = settings(spelling).quant
        assert (q.method, q.bits, q.group_size, q.symmetric, q.actorder) == expected, spelling
        assert (q.damp, q.block_size, q.true_sequential) == (0.01, 128, True)  # shared fields
    q = settings(f"recipe={name}", "quant.bits=2").quant  # a field override beats the recipe
    assert q.bits == 2 and q.group_size == expected[2]


def test_no_recipe_means_gptq_w4():
    q = settings().quant
    assert (q.method, q.bits, q.group_size, q.symmetric, q.actorder) == RECIPES["gptq_w4"]


# ------------------------------------------------------------------------------------------------
# Types, bounds, unknown and removed keys
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("overwrite=no", "overwrite must be true or false, got 'no'"),
    ("quant.symmetric=no", "quant.symmetric must be true or false, got 'no'"),
    ("quant.true_sequential=1", "quant.true_sequential must be true or false, got 1"),
    ("eval.enabled=yes", "eval.enabled must be true or false, got 'yes'"),
    ("distributed.cpu_oversubscribe=off", "distributed.cpu_oversubscribe must be true or false, got 'off'"),
    ("resume=no", "resume must be auto, true or false, got 'no'"),
    ("quant.bits=4.0", "quant.bits must be one of (2, 3, 4, 8), got 4.0"),
    ("quant.bits=true", "quant.bits must be one of (2, 3, 4, 8), got True"),
    ("quant.bits='4'", "quant.bits must be one of (2, 3, 4, 8), got '4'"),
    ("quant.bits=5", "quant.bits must be one of (2, 3, 4, 8), got 5"),
    ("quant.damp=inf", "quant.damp must be a finite number between 0 and 1 (exclusive), got inf"),
    ("quant.damp=nan", "quant.damp must be a finite number between 0 and 1 (exclusive), got nan"),
    ("quant.damp=0", "quant.damp must be a finite number between 0 and 1 (exclusive), got 0"),
    ("quant.damp=1", "quant.damp must be a finite number between 0 and 1 (exclusive), got 1"),
    ("quant.damp=-0.01", "quant.damp must be a finite number between 0 and 1 (exclusive), got -0.01"),
    ("quant.group_size=0", "quant.group_size must be a positive integer or -1 (per-channel), got 0"),
    ("quant.group_size=-2", "quant.group_size must be a positive integer or -1 (per-channel), got -2"),
    ("quant.group_size=64.0", "quant.group_size must be a positive integer or -1 (per-channel), got 64.0"),
    ("quant.group_size=10000000000", "quant.group_size must be at most 1048576 (wider than any layer; -1 gives "
                                     "one group per row), got 10000000000"),
    ("quant.actorder=random", "quant.actorder must be one of ('none', 'static', 'dynamic', 'folded'), got 'random'"),
    ("quant.method=awq", "quant.method must be one of ('gptq', 'rtn'), got 'awq'"),
    ("quant.block_size=0", "quant.block_size must be a positive integer, got 0"),
    ("data.num_samples=-1", "data.num_samples must be a positive integer, got -1"),
    ("data.eval_fraction=1.5", "data.eval_fraction must be a number between 0 and 1 (exclusive), got 1.5"),
    ("data.bos=maybe", "data.bos must be auto, true or false, got 'maybe'"),
    ("model.dtype=int8", "model.dtype must be auto or one of ['float32', 'bfloat16', 'float16'], got 'int8'"),
    ("cache.heap=small", "cache.heap must be one of ('compact', 'fast'), got 'small'"),
    ("cache.host_mib=-1", "cache.host_mib must be a number of MiB ≥ 0 or null (unlimited), got -1"),
    ("cache.host_mib=true", "cache.host_mib must be a number of MiB ≥ 0 or null (unlimited), got True"),
    ("distributed.timeout_s=0", "distributed.timeout_s must be a positive number of seconds, got 0"),
    ("distributed.timeout_s=inf", "distributed.timeout_s must be a positive number of seconds, got inf"),
    ("trainer.devices=0", "trainer.devices must be a positive integer, got 0"),
    ("trainer.strategy=horovod", "trainer.strategy must be one of ('auto', 'ddp', 'fsdp'), got 'horovod'"),
    ("trainer.accelerator=abacus", "trainer.accelerator must be one of ('auto', 'cpu', 'cuda', 'gpu', 'mps'), "
                                   "got 'abacus'"),
    ("pipeline.solve_threads=0", "pipeline.solve_threads must be a positive integer, got 0"),
    ("output_dir=2024", "output_dir must be a non-empty string (quote a value that looks like a number), got 2024"),
    ("seed=-1", "seed must be an integer ≥ 0, got -1"),
    ("quant.bits=${oops}", "quant.bits: Interpolation key 'oops' not found"),
])
def test_bad_values_are_refused_with_one_line(override, message):
    assert refused(override) == message


def test_good_edge_values_pass():
    s = settings("quant.group_size=-1", "quant.damp=0.5", "cache.host_mib=0.5", "quant.true_sequential=false",
                 f"quant.group_size={1 << 20}", "resume=true", "data.bos=false", "output_dir='2024'")
    assert s.quant.group_size == 1 << 20 and s.cache.host_mib == 0.5 and s.resume is True and s.data.bos is False
    assert s.output_dir == "2024"


def _leaf_fields(cls=Settings, prefix=""):
    """(dotted key, resolved type) of every value field of the schema, recovery's included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from _leaf_fields(f.metadata["section"], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def _kinds(hint) -> set:
    return set(typing.get_args(hint)) | {hint} if typing.get_args(hint) else {hint}


NUMERIC_KEYS = sorted(k for k, hint in _leaf_fields() if _kinds(hint) & {int, float} and bool not in _kinds(hint))
BOOLEAN_KEYS = sorted(k for k, hint in _leaf_fields() if bool in _kinds(hint))


def _with_group(key: str, *overrides: str) -> list[str]:
    return (["+recovery=lora"] if key.startswith("recovery.") else []) + list(overrides)


def test_the_schema_walk_finds_the_typed_fields():
    assert {"quant.bits", "quant.group_size", "quant.damp", "quant.block_size", "data.num_samples", "seed",
            "eval.max_windows", "cache.host_mib", "distributed.timeout_s", "recovery.rank", "recovery.alpha",
            "recovery.max_grad_norm"} <= set(NUMERIC_KEYS)
    assert {"quant.symmetric", "data.bos", "resume", "eval.enabled", "recovery.merge"} <= set(BOOLEAN_KEYS)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", ["true", "false"])
def test_no_number_field_accepts_a_bool(key, value):
    """true/false are ints to Python (True == 1): every int or float field refuses them by type,
    naming the field and the value as written."""
    message = refused(*_with_group(key, f"{key}={value}"))
    assert message.startswith(f"{key} must be ") and message.endswith(f", got {value.capitalize()}"), message


@pytest.mark.parametrize("key", BOOLEAN_KEYS)
@pytest.mark.parametrize("value", ["1", "0"])
def test_no_true_false_field_accepts_a_number(key, value):
    """The other way round (1 == True): true/false fields, auto-or-bool ones too, refuse 1 and 0."""
    message = refused(*_with_group(key, f"{key}={value}"))
    assert message.startswith(f"{key} must be ") and message.endswith(f", got {value}"), message


@pytest.mark.parametrize("key", ["seed", "data.seed", "recovery.seed"])
def test_seeds_beyond_64_bits_are_refused(key):
    """torch's generators take seeds below 2**64; a larger one crashed the run with a traceback."""
    assert refused(*_with_group(key, f"{key}={1 << 64}")) == (
        f"{key} must be at most {(1 << 64) - 1} (random generators take 64-bit seeds), got {1 << 64}")
    from operator import attrgetter

    assert attrgetter(key)(settings(*_with_group(key, f"{key}={(1 << 64) - 1}"))) == (1 << 64) - 1


def test_timeouts_beyond_what_a_collective_takes_are_refused():
    """distributed.timeout_s becomes a timedelta (at most 999999999 days); a larger finite number
    crashed the launch with an OverflowError."""
    assert refused("distributed.timeout_s=1e300") == (
        "distributed.timeout_s must be at most 1000000000 seconds (about 31 years), got 1e+300")
    assert settings("distributed.timeout_s=1000000000").distributed.timeout_s == 1_000_000_000


def test_rules_as_built_refuse_the_wrong_type_and_keep_their_bounds():
    """The rule builders, called here (the schema's rules are built once at import, where a
    mutation test cannot see them): literal types only, bounds, extra values, maxima."""
    from fabricq.config import integer, number, one_of, optional, section, setting

    def message(check, value):
        with pytest.raises(FabricqError) as info:
            check(value, "k")
        return str(info.value)

    positive = integer(1, "a positive integer")
    assert positive(1, "k") == 1 and positive(7, "k") == 7
    for bad in (True, 0, -1, 2.0, "3"):
        assert message(positive, bad) == f"k must be a positive integer, got {bad!r}"
    group = integer(1, "a group", also=(-1,), maximum=64, why=" (the width)")
    assert group(-1, "k") == -1 and group(64, "k") == 64
    assert message(group, -2) == "k must be a group, got -2"
    assert message(group, 65) == "k must be at most 64 (the width), got 65"

    fraction = number("a fraction", above=0, below=1)
    assert fraction(0.5, "k") == 0.5
    for bad in (True, 0, 1, float("nan"), float("inf"), "0.5"):
        assert message(fraction, bad) == f"k must be a fraction, got {bad!r}"
    size = number("a size", at_least=0, maximum=10, why=" MiB")
    assert size(0, "k") == 0 and size(10.0, "k") == 10.0 and number("any")(-3.5, "k") == -3.5
    assert message(size, -0.5) == "k must be a size, got -0.5"
    assert message(size, 11) == "k must be at most 10 MiB, got 11"

    bits = one_of(2, 4)
    assert bits(2, "k") == 2 and bits(4, "k") == 4
    for bad in (True, 3, 4.0, "4"):
        assert message(bits, bad) == f"k must be one of (2, 4), got {bad!r}"
    flag = one_of("auto", True, False, what="auto, true or false")
    assert flag(False, "k") is False and flag("auto", "k") == "auto"
    assert message(flag, 1) == "k must be auto, true or false, got 1"

    maybe = optional(positive)
    assert maybe(None, "k") is None and maybe(3, "k") == 3
    assert message(maybe, True) == "k must be a positive integer, got True"

    value, group_field = setting(3, positive), section(Settings)
    assert value.default == 3 and value.metadata["check"] is positive
    assert group_field.default_factory is Settings and group_field.metadata["section"] is Settings


def test_recovery_target_modules_are_a_list_of_names():
    assert settings("+recovery=lora", "recovery.target_modules=[q_proj,'re:.*v_proj']").recovery.target_modules == (
        "q_proj", "re:.*v_proj")
    assert settings("+recovery=lora").recovery.target_modules is None
    for bad, shown in (("q_proj", "'q_proj'"), ("[]", "[]"), ("[q_proj,3]", "['q_proj', 3]"), ("['']", "['']")):
        assert refused("+recovery=lora", f"recovery.target_modules={bad}") == (
            "recovery.target_modules must be null (every quantized Linear) or a list of module names, suffixes "
            f"(q_proj) or re:patterns, got {shown}")


def test_tp_aware_turns_dynamic_act_order_into_folded_and_keeps_the_rest():
    s = settings("export.tp_aware=true", "quant.actorder=dynamic", "quant.bits=3")
    assert s.quant == dataclasses.replace(Settings().quant, actorder="folded", bits=3)
    assert settings("export.tp_aware=true").quant.actorder == "static"
    assert settings("quant.actorder=dynamic").quant.actorder == "dynamic"


@pytest.mark.parametrize("override, message", [
    ("+quant.anything=1", f"unknown setting quant.anything: the quant settings are {QUANT_NAMES}"),
    ("+eval.bogus=1", "unknown setting eval.bogus: the eval settings are enabled, path, seq_len, max_windows, "
                      "stride, kl_windows, kl_top_k, cache"),
    ("+verbose=true", "unknown setting verbose: the top-level keys are model, data, quant, trainer, distributed, "
                      "cache, pipeline, eval, export, " + "".join(f"{f.name}, " for f in dataclasses.fields(Settings)
                                                                   if f.name == "recovery")
                      + "output_dir, overwrite, resume, seed"),
    ("+quant.bits.low=1", "quant.bits must be one of (2, 3, 4, 8), got {'low': 1}"),
])
def test_unknown_keys_are_refused_naming_the_valid_ones(override, message):
    assert refused(override) == message


def test_unknown_key_messages_name_the_first_wrong_part():
    from fabricq.config import unknown_key_message

    assert unknown_key_message("nonsense.x").startswith("unknown setting nonsense.x: the top-level keys are model, ")
    assert unknown_key_message("quant.bits.x") == "quant.bits.x is not a setting: quant.bits is a value, not a group"
    assert unknown_key_message("quant") == "quant is a group of settings, not a value"
    # Two groups deep: the group is named by its whole path.
    assert refused("+recovery=lora", "+recovery.data.bogus=1") == (
        "unknown setting recovery.data.bogus: the recovery.data settings are path")


@pytest.mark.parametrize("key", sorted(REMOVED))
def test_removed_fields_say_what_became_of_them(key):
    message = refused(f"+{key}=1")
    assert message == REMOVED[key]
    assert message.startswith(f"{key} was removed (") or message == f"{key} moved to distributed.{key.split('.')[1]}"


def test_quant_ignore_regexes_are_compiled_up_front():
    assert refused("quant.ignore=['.*lm_head','(']") == (
        "quant.ignore: '(' is not a valid regular expression (missing ), unterminated subpattern at position 0)")
    assert refused("quant.ignore=lm_head") == (
        "quant.ignore must be a list of regular expressions (quant.ignore=[REGEX,...]), got 'lm_head'")
    assert refused("quant.ignore=[3]") == "quant.ignore must hold regular expressions (strings), got 3"
    assert settings("quant.ignore=['mlp\\.down_proj$']").quant.ignore == ("mlp\\.down_proj$",)


# ------------------------------------------------------------------------------------------------
# Rules between fields, files, and the launch
# ------------------------------------------------------------------------------------------------


def test_true_sequential_cannot_honour_cache_budgets():
    message = refused("cache.host_mib=64")
    assert message.startswith("quant.true_sequential=true holds every batch's activations") and "cache.host_mib" in message
    assert settings("cache.host_mib=64", "quant.true_sequential=false").cache.host_mib == 64
    assert settings("cache.host_mib=64", "recipe=rtn_w4").quant.method == "rtn"  # no Hessians: nothing held


def test_eval_stride_must_be_shorter_than_the_window():
    assert refused("eval.seq_len=64", "eval.stride=64") == (
        "eval.stride must be null or an integer from 1 to eval.seq_len - 1 (63), got 64")
    assert settings("eval.seq_len=64", "eval.stride=32").eval.stride == 32


def test_disabled_evaluation_settings_cannot_fail_the_run(tmp_path):
    s = settings("eval.enabled=false", "eval.seq_len=0", f"eval.path={tmp_path / 'missing.txt'}",
                 "eval.stride=5000", "data.num_samples=16")
    # A bad value became the default; well-formed ones are kept; no rule involving them applies.
    assert s.eval == dataclasses.replace(Settings().eval, enabled=False, path=str(tmp_path / "missing.txt"), stride=5000)
    assert s.data.num_samples == 16
    # The held-out fraction is still read: calibration leaves those documents out either way.
    assert refused("eval.enabled=false", "data.eval_fraction=0").startswith("data.eval_fraction must be")
    assert refused("eval.enabled=false", "+eval.bogus=1").startswith("unknown setting eval.bogus")
    assert refused("eval.enabled=false", "data.num_samples=0") == "data.num_samples must be a positive integer, got 0"


def test_missing_input_files_are_named(tmp_path):
    assert refused(f"data.path={tmp_path / 'none.txt'}") == f"data.path does not exist or is not a file: {tmp_path / 'none.txt'}"
    assert refused(f"eval.path={tmp_path / 'none.txt'}").startswith("eval.path does not exist")


@pytest.mark.parametrize("overrides, environ, message", [
    (["trainer.devices=4", "data.num_samples=8", "data.batch_size=4", "distributed.cpu_oversubscribe=true"], {},
     "4 ranks but only 2 calibration batches (data.num_samples=8, data.batch_size=4): every rank needs at least one batch"),
    (["trainer.devices=2", "distributed.cpu_oversubscribe=true"], {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"},
     "torchrun started 4 processes but trainer.devices × trainer.num_nodes = 2"),
    (["trainer.devices=2", "distributed.cpu_oversubscribe=true"], {"SLURM_NTASKS": "3", "SLURM_PROCID": "0"},
     "SLURM started 3 tasks but trainer.devices × trainer.num_nodes = 2"),
    (["trainer.num_nodes=2"], {"MASTER_ADDR": "h"}, "trainer.num_nodes=2 needs a multi-node launch: start it with "
     "torchrun or srun, or set MASTER_PORT, NODE_RANK on every node (see README, Distributed runs)"),
    (["trainer.accelerator=cpu", "trainer.strategy=fsdp"], {},
     "trainer.strategy=fsdp needs CUDA devices (Fabric's FSDP is GPU-only): use ddp on CPU"),
])
def test_launch_checks(overrides, environ, message):
    assert refused(*overrides, environ=environ) == message


def test_cpu_ranks_beyond_the_cores_need_cpu_oversubscribe():
    from fabricq.launcher import usable_cpus

    many = f"trainer.devices={usable_cpus() + 1}"
    assert refused("trainer.accelerator=cpu", many, "data.batch_size=1").endswith(
        "(pass distributed.cpu_oversubscribe=true to run more ranks than cores anyway)")
    settings("trainer.accelerator=cpu", many, "data.batch_size=1", "distributed.cpu_oversubscribe=true")


# ------------------------------------------------------------------------------------------------
# The command line: Hydra's errors and ours, one line, exit code 2
# ------------------------------------------------------------------------------------------------


def fabricq_cli(*args: str, cwd, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FABRICQ_DEBUG")}
    env.update(OMP_NUM_THREADS="1", **({"FABRICQ_DEBUG": "1"} if debug else {}))
    return subprocess.run([sys.executable, "-m", "fabricq", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


RECIPE_LIST = "gptq_w3, gptq_w4, gptq_w4_asym, gptq_w8, rtn_w4"


@pytest.mark.parametrize("args, line", [
    (["recipe=gptq_w5"], f"recipe=gptq_w5: there is no such recipe (available: {RECIPE_LIST})"),
    (["+recipe=gptq_w5"], f"recipe=gptq_w5: there is no such recipe (available: {RECIPE_LIST})"),
    (["quant=w4"], f"quant=w4: there is no such quant (available: {RECIPE_LIST})"),
    (["quant.nonsense=1"], f"unknown setting quant.nonsense: the quant settings are {QUANT_NAMES}"),
    (["+quant.anything=1"], f"unknown setting quant.anything: the quant settings are {QUANT_NAMES}"),
    (["quant.bits.low=1"], "quant.bits.low is not a setting: quant.bits is a value, not a group"),
    (["pipeline.lag=1"], REMOVED["pipeline.lag"]),
    (["trainer.timeout_s=30"], "trainer.timeout_s moved to distributed.timeout_s"),
    (["data.path=/tmp/données.txt"], "cannot read the override data.path=/tmp/données.txt: quote a value with "
     "non-ASCII characters, as data.path='/tmp/données.txt' (in a shell: \"data.path='/tmp/données.txt'\")"),
    (["quant=["], "cannot read the override quant=[ (no viable alternative at input '['): quote a value with "
     "special characters, as quant='[' (see https://hydra.cc/docs/advanced/override_grammar/basic)"),
    (["+quant=gptq_w3"], "quant is already chosen in the defaults: write quant=NAME, without the +"),
    (["quant=gptq_w3", "recipe=gptq_w8"], "recipe=gptq_w8 and quant=gptq_w3 choose different schemes: pass only one of them"),
    (["quant.symmetric=no"], "quant.symmetric must be true or false, got 'no'"),
    (["quant.damp=inf"], "quant.damp must be a finite number between 0 and 1 (exclusive), got inf"),
    (["quant.bits=true"], "quant.bits must be one of (2, 3, 4, 8), got True"),
    (["data.num_samples=true"], "data.num_samples must be a positive integer, got True"),
    (["seed=18446744073709551616"], "seed must be at most 18446744073709551615 (random generators take 64-bit "
                                    "seeds), got 18446744073709551616"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, line, tmp_path):
    result = fabricq_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"fabricq: error: {line}\n"
    assert list(tmp_path.iterdir()) == []  # no outputs/<time> folder left behind


def test_fabricq_debug_shows_the_traceback(tmp_path):
    result = fabricq_cli("recipe=gptq_w5", cwd=tmp_path, debug=True)
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "Could not find 'recipe/gptq_w5'" in result.stderr


@pytest.mark.parametrize("spelling", ["recipe=gptq_w8", "+recipe=gptq_w8", "quant=gptq_w8"])
def test_cli_recipe_spellings(spelling, tmp_path):
    result = fabricq_cli("--cfg", "job", spelling, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    quant = re.search(r"^quant:\n((?:  .*\n)+)", result.stdout, re.M).group(1)
    assert "  bits: 8\n" in quant and "  group_size: -1\n" in quant and "  method: gptq\n" in quant
