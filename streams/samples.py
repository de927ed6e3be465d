"""Small, valid sample records of every event type (for the smoke run, docs and tests)."""

from __future__ import annotations

from streams.schemas import (
    Ad,
    AdStats,
    BeamCandidate,
    Click,
    Conversion,
    DeadLetter,
    Event,
    Feedback,
    FeedbackItem,
    Impression,
    ModelUpdate,
    OrganicEngagement,
    OrganicFeedbackItem,
    OrganicItem,
    OrganicSlot,
    SlateItem,
)

T0 = 1_790_000_000.0


def sample_records(n: int = 1, user: str = "u1") -> dict[str, list[Event]]:
    """``n`` records per logical topic; ids are unique within the call."""
    out: dict[str, list[Event]] = {t: [] for t in (
        "ads", "impressions", "clicks", "conversions", "feedback", "organic-items",
        "organic-engagements", "model-updates", "ad-stats", "dlq")}
    for i in range(n):
        ad = f"ad-{i}"
        req = f"req-{user}-{i}"
        out["ads"].append(Ad(
            ad_id=ad, advertiser_id=f"adv-{i % 3}", industry="retail", bid_type="cpc",
            conversion_goal="purchase", bid=1.5, budget=1000.0,
            title=f"Running shoes {i}", description="Lightweight trail running shoes, 20% off",
            created_time=T0, event_time=T0 + i))
        item = SlateItem(ad_id=ad, semantic_id=[1, 2, 3, 0, 1, 0], position=0, score=0.5,
                         bid=1.5, bid_type="cpc")
        beams = [BeamCandidate(ad_id=ad, semantic_id=[1, 2, 3, 0, 1, 0], logprob=-0.7,
                               expected_value=0.06, bid=1.5, bid_type="cpc"),
                 BeamCandidate(ad_id=f"ad-{i}-b", semantic_id=[1, 2, 4, 0, 2, 0], logprob=-1.9,
                               expected_value=0.004, bid=4.0, bid_type="cpm")]
        video = f"cooking#{i}"
        slots = [OrganicSlot(item_id=video, semantic_id=[4, 0, 7, 1, 0, 0], position=0,
                             score=-2.5)]
        out["impressions"].append(Impression(
            request_id=req, event_time=T0 + i, user_id=user, context={"device": "ios"},
            recent_ad_ids=[], recent_organic=[f"travel#{i}"], slate=[item],
            model_version="v000001", beam_widths=[8, 8, 4], beams=beams, organic=slots))
        out["clicks"].append(Click(event_id=f"clk-{user}-{i}", request_id=req, user_id=user,
                                   ad_id=ad, event_time=T0 + i + 2))
        out["conversions"].append(Conversion(event_id=f"cv-{user}-{i}", request_id=req,
                                             user_id=user, ad_id=ad, event_time=T0 + i + 60,
                                             value=12.5))
        out["feedback"].append(Feedback(
            request_id=req, user_id=user, kind="provisional", revision=0,
            impression_time=T0 + i, event_time=T0 + i + 300, elapsed_s=300.0,
            window_closed=False, items=[FeedbackItem(
                ad_id=ad, semantic_id=[1, 2, 3, 0, 1, 0], position=0, score=0.5, bid=1.5,
                bid_type="cpc", clicked=True, reward=1.5)], beams=beams,
            recent_organic=[f"travel#{i}"],
            organic=[OrganicFeedbackItem(item_id=video, semantic_id=[4, 0, 7, 1, 0, 0],
                                         position=0, score=-2.5, viewed=True,
                                         dwell_s=41.5)]))
        out["organic-items"].append(OrganicItem(
            item_id=video, kind="video", topic="cooking", title=f"Ten-minute pasta {i}",
            description="A weeknight recipe in one pan", created_time=T0, event_time=T0 + i))
        out["organic-engagements"].append(OrganicEngagement(
            event_id=f"og-{user}-{i}", request_id=req, user_id=user, item_id=video,
            action="dwell", dwell_s=41.5, event_time=T0 + i + 45))
        out["model-updates"].append(ModelUpdate(
            model_name="adloop", version=f"v{i:06d}", parent=None, sha256="0" * 64,
            uri=f"file:///snapshots/v{i:06d}", id_space_version="ids-1",
            data_watermark=T0 + i, created_time=T0 + i))
        out["ad-stats"].append(AdStats(
            dimension="ad", id=ad, window="tumbling", window_start=T0, window_end=T0 + 60,
            impressions=10, clicks=1, conversions=0, revenue=1.5, conversion_value=0.0,
            ctr=0.1, cvr=0.0, ecpm=150.0, updated_time=T0 + 61))
        out["dlq"].append(DeadLetter.of(source_topic="clicks", partition=0, offset=i,
                                        reason="not_json", detail="sample", raw=b"{oops"))
    return out
