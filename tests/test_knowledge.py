"""gkcore.data.knowledge: regions, entity vocabulary, prompts."""
import re

import pytest

from gkcore.data import knowledge as K

# Chest ImaGenome order (REFERENCES.md)
EXPECTED_REGIONS = (
    "right lung, right upper lung zone, right mid lung zone, right lower lung zone, right hilar structures, "
    "right apical zone, right costophrenic angle, right hemidiaphragm, left lung, left upper lung zone, "
    "left mid lung zone, left lower lung zone, left hilar structures, left apical zone, left costophrenic angle, "
    "left hemidiaphragm, trachea, spine, right clavicle, left clavicle, aortic arch, mediastinum, "
    "upper mediastinum, svc, cardiac silhouette, cavoatrial junction, right atrium, carina, abdomen").split(", ")

CHEXPERT = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]


def test_regions_29_in_order():
    assert isinstance(K.REGIONS, tuple)
    assert list(K.REGIONS) == EXPECTED_REGIONS
    assert len(K.REGIONS) == 29
    assert [K.region_index(r) for r in K.REGIONS] == list(range(29))
    with pytest.raises(ValueError, match="unknown region"):
        K.region_index("left kidney")


def test_entities_count_names_and_chexpert():
    assert 40 <= len(K.ENTITIES) <= 80
    assert K.ENTITY_NAMES == tuple(e.name for e in K.ENTITIES)
    assert len(set(K.ENTITY_NAMES)) == len(K.ENTITY_NAMES)
    for n in K.ENTITY_NAMES:
        assert n == n.strip().lower(), n
    chex = [e.name for e in K.ENTITIES if e.chexpert]
    assert sorted(chex) == sorted(c.lower() for c in CHEXPERT)
    # the 14 observations come first, in CheXpert's order
    assert list(K.ENTITY_NAMES[:14]) == [c.lower() for c in CHEXPERT]


def test_entity_fields_valid():
    for e in K.ENTITIES:
        assert isinstance(e, K.Entity)
        assert isinstance(e.regions, tuple) and e.regions, e.name
        assert len(set(e.regions)) == len(e.regions), e.name
        for r in e.regions:
            assert r in K.REGIONS, (e.name, r)
        d = e.description
        assert isinstance(d, str) and 20 <= len(d) <= 300, e.name
        assert d[0].isupper() and d.endswith("."), e.name
        n_sent = len([s for s in re.split(r"(?<=[.!?])\s+", d) if s])
        assert 1 <= n_sent <= 2, (e.name, d)
        assert d.lower() != e.name
    # descriptions are distinct
    assert len({e.description for e in K.ENTITIES}) == len(K.ENTITIES)


def test_anatomical_plausibility_of_regions():
    regs = {e.name: set(e.regions) for e in K.ENTITIES}
    assert regs["cardiomegaly"] <= {"cardiac silhouette", "right atrium"}
    assert {"right costophrenic angle", "left costophrenic angle"} <= regs["pleural effusion"]
    assert "abdomen" in regs["pneumoperitoneum"]
    assert regs["scoliosis"] == {"spine"}
    for n in ("consolidation", "nodule", "atelectasis", "pneumonia"):
        assert all("lung" in r for r in regs[n]), n


def test_entity_index_roundtrip_synonyms_and_errors():
    for i, n in enumerate(K.ENTITY_NAMES):
        assert K.entity_index(n) == i
        assert K.entity_index(n.upper()) == i
        assert K.entity_index(K.ENTITIES[i]) == i
    assert K.entity_index("effusion") == K.entity_index("pleural effusion")
    assert K.entity_index(" Pulmonary Edema ") == K.entity_index("edema")
    for syn, target in K.ENTITY_SYNONYMS.items():
        assert target in K.ENTITY_NAMES, syn
    with pytest.raises(ValueError, match="unknown entity"):
        K.entity_index("broken heart")
    with pytest.raises(TypeError):
        K.entity_index(3)


def test_prompts():
    ep = K.entity_prompts()
    assert len(ep) == len(K.ENTITIES)
    for e, p in zip(K.ENTITIES, ep):
        assert p == f"{e.name}: {e.description}"
    rp = K.region_prompts("pleural effusion")
    e = K.get_entity("pleural effusion")
    assert rp == [f"pleural effusion in the {r}" for r in e.regions]
    assert K.region_prompts(K.ENTITIES[2]) == [f"{K.ENTITIES[2].name} in the {r}" for r in K.ENTITIES[2].regions]
    with pytest.raises(ValueError):
        K.region_prompts("not an entity")


def test_lazy_exports():
    import gkcore.data as D

    assert D.REGIONS is K.REGIONS and D.ENTITIES is K.ENTITIES
    assert D.entity_index("cardiomegaly") == K.entity_index("cardiomegaly")
