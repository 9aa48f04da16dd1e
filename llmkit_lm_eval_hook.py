"""Makes lm-eval's own `lm_eval` command know `--model llmkit`.

lm-eval 0.4 looks models up in a registry that only its own `lm_eval.models` package fills; it has
no plugin discovery. `llmkit_lm_eval_hook.pth` (installed beside this module in site-packages)
calls `install()` at interpreter start-up, which waits for `lm_eval.models` to be imported and then
registers `llmkit` as a lazy "module:Class" entry. Start-up cost is one list insert: nothing from
lm-eval or llmkit (or torch) is imported until lm-eval itself asks for its models.
"""
import sys
from importlib.abc import MetaPathFinder

LAZY_TARGET = "llmkit.eval.lm_eval:LlmkitLM"


class _RegisterAfterLmEvalModels(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        spec = None
        for finder in sys.meta_path:  # let the real finders locate the module, then wrap its loader
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            from lm_eval.api.registry import model_registry

            if "llmkit" not in model_registry:
                model_registry.register("llmkit", target=LAZY_TARGET)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if not any(isinstance(f, _RegisterAfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLmEvalModels())
