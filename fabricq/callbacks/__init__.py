"""The calibration loop's callbacks; and `GPTQ`, the Lightning callback (`fabricq.lightning`),
loaded on first use so that the loop's callbacks do not import Lightning's Trainer."""


def __getattr__(name: str):
    if name == "GPTQ":
        from fabricq.lightning import GPTQ

        return GPTQ
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
