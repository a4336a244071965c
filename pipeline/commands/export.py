"""`n2n export MODEL OUT`: the model for ONNX Runtime, plain torch or the BioImage Model Zoo."""
from __future__ import annotations

import click

from pipeline.commands.friendly_errors import FriendlyCommand, debug_option
from pipeline.export.bioimageio_format import PackageInfo
from pipeline.export.run import FORMATS, ExportConfig, run_export


@click.command("export", cls=FriendlyCommand)
@click.argument("model", metavar="MODEL")
@click.argument("output", metavar="OUT")
@click.option("--format", "format_", type=click.Choice(FORMATS), default=None,
              help="onnx (OUT.onnx), torch (a new folder OUT with n2n_model.py and n2n_model.safetensors) or "
                   "bioimageio (OUT.zip, a BioImage Model Zoo package). Default: from OUT's suffix.")
@click.option("--name", default=PackageInfo.name, show_default=True, help="bioimageio: the model's name.")
@click.option("--author", "authors", multiple=True, help="bioimageio: an author's name (repeat for more; default: n2n).")
@click.option("--maintainer", "maintainers", multiple=True,
              help="bioimageio: a maintainer's GitHub user name (the zoo asks for one to upload).")
@click.option("--license", "license_", default=PackageInfo.license, show_default=True,
              help="bioimageio: the weights' licence, an SPDX id.")
@debug_option
def export_command(model, output, format_, name, authors, maintainers, license_) -> None:
    """Write the model MODEL ('default', a checkpoint path or a URI) as OUT, for other tools.

    onnx: dynamic batch, height and width (multiples of the model's size multiple, in its
    metadata), opset 18. torch: a torch.nn module and its weights, loadable with torch
    alone. bioimageio: rdf.yaml, ONNX and torch weights, test tensors, README and cover.
    OUT must not exist: n2n export never replaces anything. docs/export.md shows each
    format in use.
    """
    info = PackageInfo(name=name, authors=tuple(authors) or PackageInfo.authors, maintainers=tuple(maintainers),
                       license=license_)
    result = run_export(ExportConfig(model=model, output=output, format=format_, package=info))
    click.echo(result.format_line())
