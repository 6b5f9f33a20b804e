"""The datasets the `fusion_pairs` builder knows: names, folder layouts, download instructions.

Each config of `CONFIGS` (names: `CONFIG_NAMES`) says where its dataset's two modalities live
in the user's folder and where users get it. Every config accepts a folder holding just `ir/`
and `vi/`; each also knows the layout its dataset is distributed in (see
`FusionPairsConfig.instructions`, the builder's `MANUAL_DOWNLOAD_INSTRUCTIONS`). A folder
without split sub-folders becomes the `train` split (`sources.find_layout` finds them).
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

_COMMON_LAYOUT = ("  <manual_dir>/ir/  and  <manual_dir>/vi/   "
                  "(files paired by name: ir/00001.png <-> vi/00001.jpg)")


@dataclasses.dataclass(eq=False)
class FusionPairsConfig(tfds.core.BuilderConfig):
  """Where a dataset's two modalities live inside the user's folder.

  Attributes:
    ir_folders: names (case-insensitive) of the folder with the infrared-slot images
      (infrared, or PET/SPECT/CT for the medical pairs), tried in order; `ir` is always tried.
    vis_folders: the same for the visible-slot images (visible, or MRI); `vi` is always tried.
    homepage: where users get the data.
    layout: the layouts the dataset is distributed in, for the instructions.
    resize_visible: by default, resize a visible image whose size differs from its
      infrared partner's to that size (RoadScene's `crop_HR_visible` images are about
      2.8 x 3.1 times their infrared partners; its `crop_LR_visible` are them scaled down).
  """

  ir_folders: tuple[str, ...] = ()
  vis_folders: tuple[str, ...] = ()
  homepage: str = ""
  layout: str = ""
  resize_visible: bool = False

  def ir_candidates(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*self.ir_folders, "ir"]))

  def vis_candidates(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*self.vis_folders, "vi"]))

  def instructions(self) -> str:
    return (
        f"{self.description}\nGet it from: {self.homepage}\n"
        f"Point --manual_dir at the folder holding it. Accepted layouts:\n"
        f"{self.layout}\n{_COMMON_LAYOUT}\n"
        "  or train/ and test/ sub-folders each holding one of these pairs of folders.\n"
        "A folder without train/test sub-folders becomes the `train` split."
    )


def _config(name, ir, vis, homepage, layout, description,
            resize_visible=False) -> FusionPairsConfig:
  return FusionPairsConfig(
      name=name, version=tfds.core.Version("1.0.0"), description=description,
      ir_folders=tuple(ir), vis_folders=tuple(vis), homepage=homepage, layout=layout,
      resize_visible=resize_visible)


CONFIGS = (
    _config("msrs", ["ir", "Infrared"], ["vi", "Visible"], "https://github.com/Linfeng-Tang/MSRS",
            "  <manual_dir>/train/{ir,vi}/  and  <manual_dir>/test/{ir,vi}/   "
            "(as in the MSRS repository)",
            "MSRS: 1,083 train and 361 test aligned infrared/visible road scenes (480x640)."),
    _config("llvip", ["infrared", "ir"], ["visible", "vi"], "https://bupt-ai-cz.github.io/LLVIP/",
            "  <manual_dir>/infrared/{train,test}/  and  <manual_dir>/visible/{train,test}/   "
            "(the LLVIP archive)",
            "LLVIP: 15,488 low-light infrared/visible pairs (1280x1024), train/test split."),
    _config("roadscene", ["cropinfrared", "ir", "Infrared"], ["crop_LR_visible", "vi", "Visible"],
            "https://github.com/hanna-xu/RoadScene",
            "  <manual_dir>/cropinfrared/  and  <manual_dir>/crop_LR_visible/   "
            "(the RoadScene repository;\n"
            "  crop_HR_visible/ images may stand in for crop_LR_visible/: "
            "they are resized to the infrared size)",
            "RoadScene: 221 aligned infrared/visible road scenes (various sizes).",
            resize_visible=True),
    _config("tno", ["Infrared", "IR", "ir"], ["Visible", "VIS", "vi"],
            "https://figshare.com/articles/dataset/TNO_Image_Fusion_Dataset/1008029",
            "  <manual_dir>/Infrared/  and  <manual_dir>/Visible/   "
            "(TNO pairs, renamed so the two files share a name)",
            "TNO Image Fusion Dataset: military and surveillance infrared/visible pairs."),
    _config("m3fd", ["Ir", "Infrared"], ["Vis", "Visible"], "https://github.com/JinyuanLiu-CV/TarDAL",
            "  <manual_dir>/Ir/  and  <manual_dir>/Vis/   (M3FD_Fusion or M3FD_Detection)",
            "M3FD: 4,200 infrared/visible pairs (1024x768) from the TarDAL project."),
    _config("harvard_mri_pet", ["PET"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/PET/  and  <manual_dir>/MRI/   "
            "(PET in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-PET pairs (256x256; PET in colour)."),
    _config("harvard_mri_spect", ["SPECT"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/SPECT/  and  <manual_dir>/MRI/   "
            "(SPECT in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-SPECT pairs (256x256; SPECT in colour)."),
    _config("harvard_mri_ct", ["CT"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/CT/  and  <manual_dir>/MRI/   "
            "(CT in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-CT pairs (256x256)."),
    _config("paired_folders", [], [], "your own data",
            "  <manual_dir>/<ir_folder>/  and  <manual_dir>/<vis_folder>/   "
            "(names given with --ir_folder/--vis_folder)",
            "Any two folders of aligned image pairs, matched by file name."),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


def paired_folders_config(ir_folder: str, vis_folder: str) -> FusionPairsConfig:
  """The generic config for two user-named sub-folders (`ir/` and `vi/` are also accepted).

  For finding the folders (`sources.find_layout`) only: a builder is never given it (TFDS
  refuses a config named like one of the builder's own); `builders.FusionPairs` takes the
  names as options.
  """
  base = next(c for c in CONFIGS if c.name == "paired_folders")
  return dataclasses.replace(base, ir_folders=(ir_folder,), vis_folders=(vis_folder,))
