"""pneumoscan: train, evaluate, explain and serve CNNs that tell pneumonia from normal on chest X-rays.

The package is built in five layers, each a subpackage that imports only from the layers below it:
`apps` (command line, server, DICOM node), `tasks` (train, evaluate, predict, ...), `networks` (models,
checkpoints, inference forms), `io` (images, DICOM, data, result files) and `core` (pure arithmetic).
docs/design.md draws them. The flat names of earlier releases (`pneumoscan.predict`) still import, as
deprecated aliases of their new homes (`pneumoscan.tasks.predict`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

LAYERS = {
    "core": ("config", "metrics", "calibration", "prevalence", "overlap", "shift", "sites"),
    "io": ("fileio", "images", "dicom", "dicom_acquisition", "data", "records", "provenance", "tracking", "plots",
           "dicom_sr"),
    "networks": ("models", "adam", "augment", "cpu_kernels", "cuda_graphs", "emulated_bf16", "runtime", "inference",
                 "ensemble_model", "checkpoint", "ood", "export"),
    "tasks": ("train", "fitting", "rundir", "evaluate", "predict", "explain", "ensemble", "audit", "compare",
              "keras_import", "adapt", "scoring", "review", "report"),
    "apps": ("cli", "cli_parser", "serve", "serve_api", "serve_guard", "serve_http", "serve_docs", "page",
             "dicom_node", "dicom_settings", "modelcard"),
}
MOVED = {f"{__name__}.{module}": f"{__name__}.{layer}.{module}" for layer, modules in LAYERS.items() for module in modules}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `pneumoscan.<module>` of the flat layout as the module at its new place, with a DeprecationWarning."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} has moved to {MOVED[spec.name]}; the old name will go in a later release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set the alias's spec on the module object both names share: give its own back
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_MovedModule())
