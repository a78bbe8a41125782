from core import catalog, jobs, selection, uncertainty
from core.config import PRESETS
from tests.conftest import TESTER, TWO_CLASSES, add_labelled_images


def catalog_order(db) -> list[int]:
    """The Label page's catalog order, followed from the start until it comes round again."""
    order = [catalog.next_unlabelled_image_id(db)]
    while order[-1] is not None and (following := catalog.next_unlabelled_image_id(db, order[-1])) != order[0]:
        order.append(following)
    return [image_id for image_id in order if image_id is not None]


def exclude(db, image_id: int) -> None:
    db.execute("UPDATE images SET excluded = 1 WHERE id = ?", [image_id])


def test_both_label_orders_offer_the_same_images_leaving_out_excluded_ones(workspace, db, make_run):
    add_labelled_images(workspace, db, TWO_CLASSES, unlabelled=4)
    unlabelled = catalog.image_ids(db, catalog.ImageFilter(unlabelled=True))
    make_run()  # the current model predicted every unlabelled image, the soon excluded one too
    exclude(db, unlabelled[1])
    catalog.set_label(db, unlabelled[3], "green", actor=TESTER)
    catalog.archive_class(db, "green", actor=TESTER)  # labelled with an archived class: not offered again either

    expected = [unlabelled[0], unlabelled[2]]
    assert catalog_order(db) == expected
    assert sorted(uncertainty.unsure_first_image_ids(db)) == expected


def test_a_run_predicts_the_images_awaiting_a_label_when_it_trains_not_excluded_ones(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=TESTER)
    first, second = catalog.image_ids(db, catalog.ImageFilter(unlabelled=True))
    labelled = next(r["image_id"] for r in db.query("SELECT image_id FROM run_items WHERE run_id = ?", [run_id]))
    exclude(db, first)
    exclude(db, labelled)  # after the snapshot: the run still trains on it

    dataset, _ = selection.run_dataset(labelled_workspace, db, run_id)

    assert [item.image_id for item in dataset.split(selection.UNLABELLED_SPLIT)] == [second]
    assert labelled in {item.image_id for item in dataset.items if item.label is not None}
    assert first not in {item.image_id for item in selection.dataset_from_catalog(labelled_workspace, db).items}
