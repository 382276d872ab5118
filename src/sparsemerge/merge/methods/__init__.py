"""The merge methods, one module per family; each module registers its methods in
:data:`sparsemerge.merge.base.MERGE_METHODS` when imported (``register_method``), and this
package imports them all. ``import sparsemerge.merge`` imports this package, so the registry
is full whenever any part of :mod:`sparsemerge.merge` is in use.

* :mod:`.gta` -- generalized task arithmetic, one table: ``task_arithmetic``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``
* :mod:`.linear` -- ``linear`` (weighted soup, LMC path) and ``model_soup`` (uniform soup)
* :mod:`.slerp` -- ``slerp``
* :mod:`.model_stock` -- ``model_stock``
* :mod:`.orthogonal` -- ``orthogonal`` (Gram-Schmidt task vectors)
* :mod:`.passthrough` -- ``passthrough`` (layer stitching with ``slices``)

A new method is one more module here (a function decorated with ``register_method``): every
module of this package is imported below. The greedy soup is a search over evaluations, not a per-tensor method: it
is :func:`sparsemerge.merge.soups.greedy_soup`.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
