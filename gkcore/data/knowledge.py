"""Medical knowledge shared by the data side and the model: anatomical regions and the entity vocabulary.

- ``REGIONS``: the 29 Chest ImaGenome anatomical region names, in the dataset's fixed order. "right" and
  "left" are the *patient's* sides; in a PA radiograph the patient's right appears on the image's left.
- ``ENTITIES``: the finding vocabulary (the 14 CheXpert observations plus common radiology findings), each
  with a short description written for this project and the regions where it usually appears.
- ``entity_prompts()`` / ``region_prompts(entity)``: the knowledge prompts fed to the knowledge encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

REGIONS: Tuple[str, ...] = (
    "right lung",
    "right upper lung zone",
    "right mid lung zone",
    "right lower lung zone",
    "right hilar structures",
    "right apical zone",
    "right costophrenic angle",
    "right hemidiaphragm",
    "left lung",
    "left upper lung zone",
    "left mid lung zone",
    "left lower lung zone",
    "left hilar structures",
    "left apical zone",
    "left costophrenic angle",
    "left hemidiaphragm",
    "trachea",
    "spine",
    "right clavicle",
    "left clavicle",
    "aortic arch",
    "mediastinum",
    "upper mediastinum",
    "svc",
    "cardiac silhouette",
    "cavoatrial junction",
    "right atrium",
    "carina",
    "abdomen",
)

REGION_INDEX: Dict[str, int] = {r: i for i, r in enumerate(REGIONS)}
NUM_REGIONS = len(REGIONS)  #: 29: the R of every (B, R, 4) region-box tensor


def region_index(name: str) -> int:
    """Position of region ``name`` in :data:`REGIONS` (case-insensitive); ValueError if unknown."""
    key = str(name).strip().lower()
    if key not in REGION_INDEX:
        raise ValueError(f"unknown region {name!r}; expected one of {list(REGIONS)}")
    return REGION_INDEX[key]


@dataclass(frozen=True)
class Entity:
    """One finding of the vocabulary.

    ``name``: lower-case finding name; ``description``: one or two sentences in our own words;
    ``regions``: names from :data:`REGIONS` where it usually appears; ``chexpert``: True for the 14
    CheXpert observations.
    """

    name: str
    description: str
    regions: Tuple[str, ...]
    chexpert: bool = False


# region groups used below
_LUNG_ZONES = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "left lung", "left upper lung zone", "left mid lung zone", "left lower lung zone",
)
_LOWER = ("right lower lung zone", "left lower lung zone", "right lung", "left lung")
_UPPER = ("right upper lung zone", "left upper lung zone", "right apical zone", "left apical zone",
          "right lung", "left lung")
_APICES = ("right apical zone", "left apical zone", "right upper lung zone", "left upper lung zone")
_BASES = ("right costophrenic angle", "left costophrenic angle", "right lower lung zone",
          "left lower lung zone")
_HILA = ("right hilar structures", "left hilar structures")
_HEART = ("cardiac silhouette", "right atrium")
_MEDIA = ("mediastinum", "upper mediastinum")
_DIAPH = ("right hemidiaphragm", "left hemidiaphragm")
_BONES = ("spine", "right clavicle", "left clavicle")



def _E(name: str, description: str, regions: Tuple[str, ...], chexpert: bool = False) -> Entity:
    return Entity(name, description, tuple(dict.fromkeys(regions)), chexpert)  # drop repeated regions


ENTITIES: Tuple[Entity, ...] = (
    # --- the 14 CheXpert observations -----------------------------------------------------------------
    _E("no finding",
       "A normal study: clear lungs, normal heart size and mediastinum, no pleural or bony abnormality.",
       ("right lung", "left lung", "cardiac silhouette", "mediastinum"), True),
    _E("enlarged cardiomediastinum",
       "Widening of the central shadow formed by the heart and mediastinum, from cardiac enlargement, "
       "vascular dilatation, a mass or fluid.",
       ("mediastinum", "upper mediastinum", "cardiac silhouette", "aortic arch"), True),
    _E("cardiomegaly",
       "An enlarged heart, seen as a cardiac silhouette wider than about half of the chest width on a PA film.",
       ("cardiac silhouette", "right atrium"), True),
    _E("lung opacity",
       "Any area of the lung that looks whiter than it should because air has been replaced or compressed.",
       _LUNG_ZONES, True),
    _E("lung lesion",
       "A focal abnormality of the lung such as a nodule or mass, with a rounded, bounded shape.",
       _LUNG_ZONES, True),
    _E("edema",
       "Fluid in the lung interstitium or alveoli, usually from heart failure, giving hazy central and "
       "basal opacities with indistinct vessels.",
       _LUNG_ZONES + _HILA, True),
    _E("consolidation",
       "Airspaces filled with fluid, pus or cells, producing a dense opacity that may contain air bronchograms.",
       _LUNG_ZONES, True),
    _E("pneumonia",
       "Infection of the lung, typically shown as a new focal consolidation in the right clinical setting.",
       _LUNG_ZONES, True),
    _E("atelectasis",
       "Partial collapse of lung tissue with volume loss, often a linear or wedge-shaped opacity at the bases.",
       _LOWER + ("right mid lung zone", "left mid lung zone"), True),
    _E("pneumothorax",
       "Air in the pleural space that separates the lung edge from the chest wall, leaving a lucent rim "
       "without lung markings.",
       _APICES + ("right lung", "left lung"), True),
    _E("pleural effusion",
       "Fluid collecting in the pleural space, which blunts the costophrenic angle and forms a meniscus at "
       "the base.",
       ("right costophrenic angle", "left costophrenic angle", "right lower lung zone", "left lower lung zone",
        "right hemidiaphragm", "left hemidiaphragm"), True),
    _E("pleural other",
       "A pleural abnormality other than effusion, such as thickening, plaques or fibrosis of the pleura.",
       ("right lung", "left lung", "right apical zone", "left apical zone", "right costophrenic angle",
        "left costophrenic angle"), True),
    _E("fracture",
       "A break in a bone visible on the film, most often a rib, clavicle or vertebra.",
       _BONES + ("right lung", "left lung"), True),
    _E("support devices",
       "Medical hardware seen on the film: lines, tubes, catheters, pacemakers or surgical clips.",
       ("svc", "cavoatrial junction", "right atrium", "trachea", "mediastinum", "abdomen"), True),
    # --- common findings -------------------------------------------------------------------------------
    _E("nodule",
       "A small rounded opacity in the lung, under three centimetres across.",
       _LUNG_ZONES),
    _E("mass",
       "A rounded lung or mediastinal opacity larger than three centimetres, suspicious for a tumour.",
       _LUNG_ZONES + _HILA + ("mediastinum",)),
    _E("infiltration",
       "Ill-defined increased density spreading through lung tissue, from fluid or inflammatory cells.",
       _LUNG_ZONES),
    _E("interstitial opacity",
       "A fine reticular or linear pattern of thickened lung interstitium rather than filled airspaces.",
       _LUNG_ZONES),
    _E("ground glass opacity",
       "A hazy increase in lung density through which vessels and bronchi remain visible.",
       _LUNG_ZONES),
    _E("emphysema",
       "Destruction of alveolar walls that leaves hyperlucent, overinflated lungs with flattened diaphragms.",
       _LUNG_ZONES + _DIAPH),
    _E("hyperinflation",
       "Lungs holding more air than normal, with low flat hemidiaphragms and an elongated chest.",
       ("right lung", "left lung") + _DIAPH),
    _E("fibrosis",
       "Scarring of the lung with coarse lines, volume loss and distorted architecture.",
       _LUNG_ZONES),
    _E("scarring",
       "A localised linear or band-like density left behind by old lung injury.",
       _LUNG_ZONES + _APICES),
    _E("calcified granuloma",
       "A small, very dense, well-defined calcified nodule, the healed remnant of an old infection.",
       _LUNG_ZONES + _HILA),
    _E("granuloma",
       "A small nodule formed by an old inflammatory reaction, often calcified and of no concern.",
       _LUNG_ZONES + _HILA),
    _E("pleural thickening",
       "Thickening of the pleural lining, seen as a band of soft tissue along the chest wall or apex.",
       ("right lung", "left lung", "right apical zone", "left apical zone")),
    _E("hilar enlargement",
       "Prominent or bulky hila from enlarged lymph nodes or dilated pulmonary arteries.",
       _HILA),
    _E("lymphadenopathy",
       "Enlarged lymph nodes, seen on a radiograph as hilar or mediastinal widening.",
       _HILA + _MEDIA),
    _E("vascular congestion",
       "Engorged pulmonary vessels, especially in the upper zones, an early sign of fluid overload.",
       _HILA + ("right upper lung zone", "left upper lung zone", "right lung", "left lung")),
    _E("widened mediastinum",
       "A mediastinum broader than expected, raising concern for vascular injury, nodes or a mass.",
       _MEDIA + ("aortic arch",)),
    _E("tortuous aorta",
       "An elongated, curving thoracic aorta, common with age and usually harmless.",
       ("aortic arch", "mediastinum", "upper mediastinum")),
    _E("aortic calcification",
       "Calcium deposits in the wall of the aortic arch, seen as a thin dense curved line.",
       ("aortic arch", "upper mediastinum")),
    _E("elevated hemidiaphragm",
       "One half of the diaphragm sitting higher than expected, from volume loss, nerve palsy or a mass below.",
       _DIAPH),
    _E("blunted costophrenic angle",
       "Loss of the sharp angle where the diaphragm meets the chest wall, often from a small effusion or scarring.",
       ("right costophrenic angle", "left costophrenic angle")),
    _E("hydropneumothorax",
       "Both air and fluid in the pleural space, forming a straight horizontal air-fluid level.",
       ("right lung", "left lung", "right costophrenic angle", "left costophrenic angle")),
    _E("subcutaneous emphysema",
       "Air tracking in the soft tissues of the chest wall or neck, seen as dark streaks outside the ribs.",
       ("right lung", "left lung", "right clavicle", "left clavicle")),
    _E("pneumomediastinum",
       "Free air in the mediastinum that outlines the heart and central vessels with a dark line.",
       _MEDIA + ("cardiac silhouette",)),
    _E("pneumoperitoneum",
       "Free air in the abdomen, seen as a lucent crescent beneath the diaphragm.",
       ("abdomen",) + _DIAPH),
    _E("cavity",
       "A gas-filled space with a thick wall inside an area of lung disease, as in abscess or tuberculosis.",
       _LUNG_ZONES),
    _E("bronchiectasis",
       "Permanently widened airways with thick walls, seen as tram-track lines or ring shadows.",
       _LOWER),
    _E("pulmonary hypertension",
       "Raised pressure in the pulmonary arteries, shown by enlarged central arteries that taper quickly.",
       _HILA + ("cardiac silhouette",)),
    _E("tuberculosis",
       "Mycobacterial infection, classically upper-zone consolidation, cavities or scarring.",
       _UPPER),
    _E("hernia",
       "Abdominal contents pushed up into the chest, such as a hiatal hernia behind the heart.",
       ("cardiac silhouette", "mediastinum", "abdomen") + _DIAPH),
    _E("scoliosis",
       "A sideways curve of the thoracic spine.",
       ("spine",)),
    _E("degenerative changes",
       "Age-related wear of the spine or joints, such as osteophytes and narrowed disc spaces.",
       ("spine", "right clavicle", "left clavicle")),
    _E("rib fracture",
       "A break in one of the ribs, seen as a cortical step or gap along the rib outline.",
       ("right lung", "left lung", "right upper lung zone", "left upper lung zone", "right lower lung zone",
        "left lower lung zone")),
    _E("clavicle fracture",
       "A break in a clavicle, usually in its middle third.",
       ("right clavicle", "left clavicle")),
    _E("endotracheal tube",
       "A breathing tube in the trachea whose tip should sit a few centimetres above the carina.",
       ("trachea", "carina")),
    _E("central venous catheter",
       "A line inserted into a large vein with its tip ideally near the cavoatrial junction.",
       ("svc", "cavoatrial junction", "right atrium")),
    _E("nasogastric tube",
       "A feeding tube passing down the oesophagus with its tip in the stomach below the diaphragm.",
       ("mediastinum", "abdomen")),
    _E("pacemaker",
       "A cardiac device with a generator in the chest wall and leads running into the heart.",
       ("cardiac silhouette", "right atrium", "svc")),
    _E("sternotomy wires",
       "Metal wires closing the sternum after heart surgery, seen over the mediastinum.",
       ("mediastinum", "cardiac silhouette")),
    _E("chest tube",
       "A drain placed in the pleural space to remove air or fluid.",
       ("right lung", "left lung", "right costophrenic angle", "left costophrenic angle")),
    _E("low lung volumes",
       "Shallow inspiration with high diaphragms that crowds the basal vessels and can mimic disease.",
       ("right lung", "left lung") + _DIAPH),
    _E("air bronchogram",
       "Air-filled bronchi made visible against surrounding consolidated lung.",
       _LUNG_ZONES),
    _E("kerley lines",
       "Short horizontal lines at the lung periphery from thickened interlobular septa, a sign of edema.",
       _BASES),
)

ENTITY_NAMES: Tuple[str, ...] = tuple(e.name for e in ENTITIES)
_ENTITY_INDEX: Dict[str, int] = {n: i for i, n in enumerate(ENTITY_NAMES)}

#: Common alternative names, mapped onto the vocabulary (used by labellers and prompts).
ENTITY_SYNONYMS: Dict[str, str] = {
    "effusion": "pleural effusion",
    "pleural effusions": "pleural effusion",
    "enlarged heart": "cardiomegaly",
    "cardiac enlargement": "cardiomegaly",
    "opacity": "lung opacity",
    "pulmonary edema": "edema",
    "collapse": "atelectasis",
    "ptx": "pneumothorax",
    "pneumothoraces": "pneumothorax",
    "infiltrate": "infiltration",
    "lymph node enlargement": "lymphadenopathy",
    "hiatal hernia": "hernia",
    "pacer": "pacemaker",
    "ng tube": "nasogastric tube",
    "et tube": "endotracheal tube",
    "central line": "central venous catheter",
}


def entity_index(name: Union[str, Entity]) -> int:
    """Position of entity ``name`` in :data:`ENTITIES` (case-insensitive; synonyms of
    :data:`ENTITY_SYNONYMS` accepted); ValueError if unknown."""
    if isinstance(name, Entity):
        name = name.name
    if not isinstance(name, str):
        raise TypeError(f"entity name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = ENTITY_SYNONYMS.get(key, key)
    if key not in _ENTITY_INDEX:
        raise ValueError(f"unknown entity {name!r}; expected one of {list(ENTITY_NAMES)}")
    return _ENTITY_INDEX[key]


def get_entity(name: Union[str, Entity]) -> Entity:
    """The :class:`Entity` called ``name`` (see :func:`entity_index`)."""
    return ENTITIES[entity_index(name)]


def entity_prompts() -> List[str]:
    """One prompt per entity, in :data:`ENTITIES` order: ``"{entity}: {description}"``."""
    return [f"{e.name}: {e.description}" for e in ENTITIES]


def region_prompts(entity: Union[str, Entity]) -> List[str]:
    """Prompts ``"{entity} in the {region}"`` for each region where ``entity`` usually appears."""
    e = get_entity(entity)
    return [f"{e.name} in the {r}" for r in e.regions]


def _check() -> None:
    assert len(REGIONS) == 29 and len(set(REGIONS)) == 29
    assert 40 <= len(ENTITIES) <= 80 and len(set(ENTITY_NAMES)) == len(ENTITY_NAMES)
    assert sum(e.chexpert for e in ENTITIES) == 14
    for e in ENTITIES:
        assert len(set(e.regions)) == len(e.regions), e.name
        for r in e.regions:
            assert r in REGION_INDEX, (e.name, r)


_check()

__all__ = ["REGIONS", "REGION_INDEX", "NUM_REGIONS", "region_index", "Entity", "ENTITIES", "ENTITY_NAMES", "ENTITY_SYNONYMS",
           "entity_index", "get_entity", "entity_prompts", "region_prompts"]
