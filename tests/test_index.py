"""The passage index: writes replace and remove exactly, any text is a valid query, corruption is one
catchable error with a rebuild, an add costs the same on a large index, and paraphrased questions
find the passage that answers them."""

from __future__ import annotations

import sqlite3
import statistics
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.data.index import Hit, Index, IndexCorrupt, match_expression, split_passages

HANDBOOK = """# Northwind Ferries: crew handbook

## Shifts and pay

Deckhands work four-day rotations followed by three days ashore. The first crossing leaves the
Millbrook pier at 05:40 on weekdays and at 07:15 on Sundays. Overtime is paid at one and a half
times the hourly rate after forty hours in a week.

Night crossings carry a supplement of 14 euros per trip. Payslips are issued on the last Thursday
of each month through the crew portal. Questions about pay go to Ingrid Solberg in the payroll office.

Rotas for the following month are published on the crew portal by the twentieth. Swapping a shift
with a colleague is allowed when the duty officer approves it in writing. Trainees are always rostered
alongside an experienced deckhand.

## Leave

Every crew member is entitled to 28 days of annual leave, including public holidays. Leave requests
must be submitted at least three weeks ahead through the rostering desk. Up to five unused days may
be carried into the next year.

Sickness must be reported to the duty officer by telephone before 04:30 on the day of the shift.
A doctor's note is required from the fourth consecutive day of absence.

Crew on leave remain reachable only for emergencies. The rostering desk answers the telephone from
eight in the morning until four in the afternoon, every day except public holidays.

## Safety

Lifejackets are inspected every Monday by the boatswain. The muster drill takes place on the first
Wednesday of each month, and attendance is compulsory for all crew. Anyone who misses it must
complete the make-up drill within seven days.

Fuel spills of any size are reported to the harbour master on VHF channel 12. The spill kits are
stored in the yellow lockers next to the vehicle ramp.

Weather warnings are relayed by the harbour office each morning. When wind exceeds force eight the
captain may cancel a crossing, and passengers are offered a full refund. The crew then report to the
pier for maintenance tasks for the rest of the shift.

## Training

New crew complete a two-week induction before their first crossing. First-aid certificates must be
renewed every three years, and the company pays the course fee. Radio operator training is offered
twice a year to deckhands with at least one year of service.

## Uniform and equipment

The company supplies two sets of uniform per year. Steel-toed boots are reimbursed up to 120 euros
once every two years on presentation of the receipt. Lost radios are replaced at the crew member's
expense after the second loss.

Uniforms are collected from the stores office on the ground floor of the terminal. Damaged equipment
is reported on the maintenance form the same day. Torches and gloves are issued at the start of each
shift and returned at the end of it.

## Passengers

Dogs travel free but must stay on a lead on the outer deck. Bicycles are charged at 4 euros per
crossing. Unaccompanied children under twelve are not allowed on board.

Ticket inspections take place on every crossing after departure. Passengers who need assistance
boarding are met at the terminal by a member of the crew. Lost property is kept at the ticket office
for three months.

Vehicles are loaded in the order they arrive at the ramp, with lorries last. Cars must switch off
their engines during the crossing. Caravans pay the lorry fare.

## Conduct

Alcohol is banned for crew from eight hours before a shift. Complaints about a colleague are raised
with the crew welfare officer, Tomasz Wren, in confidence. The crew canteen serves a free hot meal
on every shift longer than six hours.

Mobile phones stay in lockers while crew are on the vehicle deck. Crew may not accept tips from
passengers. Breaches of this handbook are handled by the operations manager under the disciplinary
procedure.
"""

# (paraphrased question, words of the answer: they lie in exactly one passage)
QUESTIONS = [
    ("What time does the earliest boat depart on a Sunday?", "07:15"),
    ("How much is the supplement for a night trip?", "14 euros"),
    ("When do payslips come out?", "last Thursday"),
    ("Who do I contact with questions about my pay?", "Ingrid Solberg"),
    ("How many holiday days do we get each year?", "28 days"),
    ("How far in advance must I request time off?", "three weeks"),
    ("How many unused leave days can I carry over?", "Up to five"),
    ("By what time do I have to report that I am sick?", "04:30"),
    ("When is a doctor's note needed for an absence?", "fourth consecutive day"),
    ("How often are the lifejackets checked?", "every Monday"),
    ("Is attending the monthly muster drill mandatory?", "compulsory"),
    ("Which radio channel do I use to report a fuel spill?", "channel 12"),
    ("Where are the spill kits kept?", "yellow lockers"),
    ("Does the company reimburse safety boots?", "120 euros"),
    ("Can passengers bring their dog on board?", "Dogs travel free"),
    ("How much does it cost to take a bicycle on the crossing?", "charged at 4 euros"),
    ("How long before my shift must I stop drinking alcohol?", "eight hours"),
    ("Who handles complaints about colleagues?", "Tomasz Wren"),
    ("Do crew members get a free meal?", "free hot meal"),
]

HOSTILE = [
    "",
    " ",
    '"',
    '""',
    "'",
    '"unterminated',
    "NEAR(a b, 2)",
    "a AND b",
    "OR",
    "NOT",
    "AND OR NOT",
    "*",
    "crossing*",
    "-crossing",
    "^crossing",
    "text:crossing",
    "{text}: crossing",
    "passages_fts:x",
    "(",
    ")",
    "((crossing)",
    "crossing) OR (",
    "a:b:c",
    "\x00",
    "cross\x00ing",
    "\x00" * 100,
    "rank MATCH 'x'",
    "'; DROP TABLE passages; --",
    "\\",
    "%",
    "_",
    "__",
    "ΑΒΓ πλοίο",
    "渡轮 时刻表",
    "عبارة الركاب",
    "😀⛴️🚢",
    "\u200b\u200d",
    "\ufeff",
    "e\u0301",
    "ǅ",
    "\ud800 crossing",
    "x" * 100_000,
    "crossing " * 20_000,
    "a" * 1_000_000,
    "é" * 1_000_000,
]


def index_at(tmp_path: Path) -> Index:
    return Index(tmp_path / "index.db", create=True)


@pytest.fixture
def handbook(tmp_path: Path) -> Index:
    index = index_at(tmp_path)
    index.add_document("hb1", "handbook.md", split_passages(HANDBOOK))
    yield index
    index.close()


def test_paraphrased_questions_find_their_passage_in_the_top_three(handbook: Index):
    passages = split_passages(HANDBOOK)
    found = 0
    for question, answer in QUESTIONS:
        holding = [p for p in passages if answer in p]
        assert len(holding) == 1, (answer, holding)
        top = [hit.text for hit in handbook.search(question, limit=3)]
        found += holding[0] in top
    recall = found / len(QUESTIONS)
    print(f"recall@3 on {len(QUESTIONS)} paraphrased questions over {len(passages)} passages: {recall:.2f}")
    assert recall >= 0.8


def test_a_hit_names_its_document_and_passage_and_scores_higher_for_a_better_match(tmp_path: Path):
    with index_at(tmp_path) as index:
        index.add_document("a" * 64, "rota/ferry.md", ["The ferry leaves at noon.", "Ferry ferry timetable."])
        index.add_document("b" * 64, "misc.txt", ["Bring a coat for the ferry."])
        hits = index.search("ferry timetable", limit=5)
        assert hits[0] == Hit("a" * 64, "rota/ferry.md", 1, "Ferry ferry timetable.", hits[0].score)
        assert len(hits) == 3 and all(h.score > 0 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len(index.search("ferry", limit=2)) == 2 and index.search("ferry", limit=0) == []


def test_re_adding_a_document_replaces_its_passages(tmp_path: Path):
    with index_at(tmp_path) as index:
        index.add_document("s1", "a.md", ["old words about ferries", "more old words"])
        index.add_document("s1", "a.md", ["new words about ferries"])
        assert index.count() == {"documents": 1, "passages": 1}
        assert [h.text for h in index.search("ferries words old new")] == ["new words about ferries"]


def test_a_new_version_at_a_path_supersedes_the_old_one_and_leaves_other_paths(tmp_path: Path):
    with index_at(tmp_path) as index:
        index.add_document("v1", "policy.md", ["Visiting hours are two to four.", "Parking is free."])
        index.add_document("other", "other.md", ["Visiting hours differ in winter."])
        assert index.supersede("policy.md", "v2", ["Visiting hours are three to five."]) == 2
        assert {h.sha256 for h in index.search("visiting hours parking")} == {"v2", "other"}
        assert [(d.sha256, d.path, d.passages) for d in index.documents()] == [
            ("other", "other.md", 1),
            ("v2", "policy.md", 1),
        ]
        assert index.supersede("policy.md", "v2", ["Visiting hours are three to five."]) == 0  # same version again


def test_removing_a_document_removes_exactly_its_passages(tmp_path: Path):
    with index_at(tmp_path) as index:
        index.add_document("keep", "keep.md", ["The canteen serves soup."])
        index.add_document("gone", "gone.md", ["The canteen closes at six.", "Soup on Fridays."])
        assert index.remove_document("gone") == 2
        assert index.remove_document("gone") == 0
        assert [h.sha256 for h in index.search("canteen soup six fridays")] == ["keep"]
        assert index.count() == {"documents": 1, "passages": 1}
        assert index.db.execute("SELECT COUNT(*) FROM passages_fts WHERE passages_fts MATCH 'six'").fetchone() == (0,)


def test_search_can_be_restricted_to_some_documents(tmp_path: Path):
    with index_at(tmp_path) as index:
        for i in range(3):
            index.add_document(f"d{i}", f"{i}.md", [f"Ferry notice number {i}."])
        assert {h.sha256 for h in index.search("ferry notice", documents={"d0", "d2", "unknown"})} == {"d0", "d2"}
        assert index.search("ferry notice", documents=set()) == []
        assert len(index.search("ferry notice", documents={f"x{i}" for i in range(5000)} | {"d1"})) == 1


def test_accents_case_and_other_scripts_are_found(tmp_path: Path):
    with index_at(tmp_path) as index:
        index.add_document(
            "s",
            "s.md",
            [
                "Le CAFÉ ouvre à huit heures.",
                "Το πλοίο φεύγει στις οκτώ.",
                "渡轮 时刻表 已更新",
                "تغادر العبارة في الثامنة",
            ],
        )
        assert index.search("cafe")[0].ordinal == 0
        assert index.search("ΠΛΟΊΟ")[0].ordinal == 1  # (diacritics are removed from Latin letters only)
        assert index.search("时刻表")[0].ordinal == 2
        assert index.search("العبارة")[0].ordinal == 3


def test_hostile_queries_return_a_list(handbook: Index):
    for query in HOSTILE:
        hits = handbook.search(query)
        assert isinstance(hits, list) and len(hits) <= 5, repr(query[:40])
    assert handbook.search("crossing* OR NOT(crossing)")  # the words still count, the syntax does not
    assert handbook.search('text:"crossing" NEAR') == handbook.search("crossing near text")


def test_a_query_is_capped_in_length_and_terms():
    words = " ".join(f"word{i}" for i in range(10_000))
    assert match_expression(words).count(" OR ") == 63
    assert match_expression("the of and") == '"the" OR "of" OR "and"'  # only stop words: keep them
    assert match_expression("the ferry of") == '"ferry"'


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Index:
    index = Index(tmp_path_factory.mktemp("index") / "index.db", create=True)
    index.add_document("hb1", "handbook.md", split_passages(HANDBOOK))
    yield index
    index.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.text(max_size=300) | st.text(alphabet=st.characters(exclude_categories=()), max_size=50),
    limit=st.integers(-3, 20),
)
def test_any_text_is_a_valid_query(shared: Index, query: str, limit: int):
    hits = shared.search(query, limit=limit)
    assert isinstance(hits, list) and len(hits) <= max(limit, 0)
    assert all(h.score > 0 and h.sha256 == "hb1" for h in hits)


def test_a_missing_file_is_corrupt_unless_asked_to_create(tmp_path: Path):
    with pytest.raises(IndexCorrupt, match="missing") as caught:
        Index(tmp_path / "none.db")
    assert caught.value.path == tmp_path / "none.db" and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "overwritten", "other-schema", "other-database"])
def test_a_damaged_file_raises_index_corrupt_and_rebuilds_atomically(tmp_path: Path, damage: str):
    path = tmp_path / "index.db"
    with Index(path, create=True) as index:
        for i in range(200):
            index.add_document(
                f"d{i}", f"{i}.md", [f"Passage {j} of document {i} about ferries. " * 5 for j in range(5)]
            )
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a database at all " * 500)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "overwritten":  # pages after the schema turned to noise
        path.write_bytes(data[: 4096 * 2] + bytes((i * 7) % 251 for i in range(len(data) - 4096 * 2)))
    elif damage == "other-schema":
        sqlite3.connect(path).execute("PRAGMA user_version = 99").connection.close()
    else:
        path.unlink()
        sqlite3.connect(path).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(IndexCorrupt):  # on opening or on the first search, without a verify
        with Index(path) as index:
            index.search("ferries document passage")
    rebuilt = Index.rebuild(path, [("fresh", "fresh.md", ["A rebuilt passage about ferries."])])
    with rebuilt:
        rebuilt.verify()
        assert [h.sha256 for h in rebuilt.search("ferries")] == ["fresh"]
        assert rebuilt.count() == {"documents": 1, "passages": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.db"]  # no temporary file left behind


def test_rebuild_leaves_no_stale_wal_to_replay(tmp_path: Path):
    path = tmp_path / "index.db"
    with Index(path, create=True) as index:
        index.add_document("old", "old.md", ["Old text about tides."])
    (tmp_path / "index.db-wal").write_bytes(b"stale" * 100)  # as a crashed writer might leave
    with Index.rebuild(path, [("new", "new.md", ["New text about tides."])]) as index:
        assert [h.sha256 for h in index.search("tides")] == ["new"]


def test_a_rebuilt_index_stays_sound_through_later_writes(tmp_path: Path):
    docs = [
        (
            f"s{d}",
            f"{d}.md",
            [f"Ferry {d} leaves pier {j} at {d % 24}:{j}0. Crew {d} check deck {j}." for j in range(6)],
        )
        for d in range(300)
    ]
    with Index.rebuild(tmp_path / "index.db", iter(docs)) as index:
        for d in range(0, 300, 3):
            index.remove_document(f"s{d}")
        for d in range(300, 340):
            index.supersede(f"{d % 50}.md", f"s{d}", [f"Ferry {d} replaces an older timetable."])
        index.verify()
        # 300 - 100 removed - 26 replaced (paths 0..39 whose document was still there) + 40 new
        assert index.count()["documents"] == 214
        assert index.search("ferry 301")[0].sha256 == "s301"


def test_writes_survive_reopening_and_work_from_another_thread(tmp_path: Path):
    path = tmp_path / "index.db"
    with Index(path, create=True, any_thread=True) as index:
        worker = threading.Thread(target=index.add_document, args=("s", "s.md", ["Tide tables are posted daily."]))
        worker.start()
        worker.join()
    with Index(path) as index:
        assert index.search("tide tables")[0].path == "s.md"


def _steps(index: Index, action) -> int:
    """SQLite VM steps an action takes (FTS5's own statements included): a count, not a timing."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    index.db.set_progress_handler(tick, 1)
    try:
        action()
    finally:
        index.db.set_progress_handler(None, 1)
    return steps[0]


def test_adding_a_document_costs_the_same_on_a_large_index(tmp_path: Path):
    words = "ferry crossing tide harbour deck crew shift leave boots radio canteen ramp pier rota".split()

    def passages(seed: int) -> list[str]:
        return [
            " ".join(f"{words[(seed * 7 + j * k) % len(words)]}{(seed + k) % 97}" for k in range(40)) for j in range(10)
        ]

    with Index(tmp_path / "big.db", create=True) as big, Index(tmp_path / "small.db", create=True) as small:
        with big.transaction():
            for d in range(1000):  # 10,000 passages
                big._insert(f"old{d}", f"{d}.md", passages(d))
        small.add_document("warm", "warm.md", passages(0))
        ratios = [
            _steps(big, lambda i=i: big.add_document(f"n{i}", f"n{i}.md", passages(5000 + i)))
            / _steps(small, lambda i=i: small.add_document(f"n{i}", f"n{i}.md", passages(5000 + i)))
            for i in range(9)
        ]
    print(f"VM steps to add a document, 10,000 passages vs one document: median ratio {statistics.median(ratios):.2f}")
    assert statistics.median(ratios) < 3, ratios


def test_split_passages_groups_sentences_under_their_heading():
    text = "# Leave\n\nStaff get 25 days. Ask Dr. Wren. Unused days carry over. Up to five.\n\n## Sick\nCall in."
    assert split_passages(text) == [  # a sentence each; "Dr." does not end one
        "Leave Staff get 25 days.",
        "Ask Dr. Wren.",
        "Unused days carry over.",
        "Up to five.",
        "Sick Call in.",
    ]
    assert split_passages(text, sentences=3) == [
        "Leave Staff get 25 days. Ask Dr. Wren. Unused days carry over.",
        "Up to five.",
        "Sick Call in.",
    ]
    assert split_passages("病房在三楼。 探视时间为下午。") == ["病房在三楼。", "探视时间为下午。"]
    assert [len(p.split()) for p in split_passages("word " * 1000)] == [200] * 5
    assert split_passages("\n\n  \n") == [] and split_passages("Just a label") == ["Just a label"]


def test_vectors_are_stored_per_model_found_by_cosine_and_go_with_their_passage(tmp_path: Path):
    import numpy as np

    with Index(tmp_path / "index.db", create=True) as index:
        index.add_document("a", "a.md", ["Ferries leave at dawn.", "Pay is monthly."])
        index.add_document("b", "b.md", ["Leave needs three weeks' notice."])
        todo = index.unembedded("m1", 10)
        assert [text for _, text in todo] == [
            "Ferries leave at dawn.",
            "Pay is monthly.",
            "Leave needs three weeks' notice.",
        ]
        axes = {pid: np.eye(3, dtype=np.float32)[i] for i, (pid, _) in enumerate(todo)}
        index.put_vectors("m1", list(axes.items()))
        assert index.unembedded("m1", 10) == [] and len(index.unembedded("m2", 10)) == 3  # another model: none yet
        nearest = index.nearest("m1", np.array([0.1, 0.9, 0.2]), 2)
        assert [h.text for h in nearest] == ["Pay is monthly.", "Leave needs three weeks' notice."]
        assert nearest[0].score == pytest.approx(0.9 / np.linalg.norm([0.1, 0.9, 0.2]), rel=1e-5)
        assert index.nearest("m2", np.ones(3), 5) == []
        index.remove_document("a")  # its passages' vectors go in the same transaction
        assert [h.sha256 for h in index.nearest("m1", np.ones(3), 5)] == ["b"]
        assert index.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 1
        gone = next(pid for pid in axes if pid not in {p for (p,) in index.db.execute("SELECT id FROM passages")})
        index.put_vectors("m1", [(gone, np.ones(3))])  # a passage deleted meanwhile leaves no orphan vector
        assert index.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 1


def test_reciprocal_rank_fusion_favours_passages_both_rankings_hold():
    from appliance.data.index import fuse

    def hits(*names: str) -> list[Hit]:
        return [Hit(n, f"{n}.md", 0, n, 1.0) for n in names]

    fused = fuse([hits("a", "b", "c"), hits("c", "d", "a")], 3)
    assert [h.sha256 for h in fused] == ["a", "c", "b"]  # a: 1/61 + 1/63; c: 1/63 + 1/61 (ties by path); b: 1/62
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63, abs=1e-6)
    assert fuse([hits("x"), []], 5)[0].sha256 == "x" and fuse([[], []], 5) == []
