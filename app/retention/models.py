from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, CheckConstraint, DateTime, ForeignKey, SmallInteger, String, Text, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class RetentionCount(Base):
    """The retention rollup: schedules counted by everything retention needs except the clock.

    Kept by statement-level triggers on `schedules` and `participants` (migration
    `retention_rollup`). Valid for any `as_of` at or after the study's watermark (the latest
    enrolment, completion or withdrawal instant it has seen): there, every comparison with
    `as_of` but those with `opens_at` and `closes_at` is already decided, and those two are keys.
    """

    __tablename__ = "retention_counts"
    __table_args__ = (CheckConstraint("cls IN ('completed', 'withdrawn', 'pending')", name="cls"),)

    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    wave: Mapped[str] = mapped_column(String(63), primary_key=True)
    opens_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    closes_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    cls: Mapped[str] = mapped_column(String(10), primary_key=True)
    in_window: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    late: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    wd_ok: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # spreads concurrent writers over rows
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RetentionGroupCount(Base):
    """The same rollup for the participants who have a complete baseline, by its `primary_group`.

    The others (no baseline yet, or no answer) are the overall count less every group's, so they
    take no row. A trigger on `responses` moves a participant's schedules when their group changes
    (migration `retention_by_primary_group_rollup`).
    """

    __tablename__ = "retention_group_counts"
    __table_args__ = (CheckConstraint("cls IN ('completed', 'withdrawn', 'pending')", name="cls"),)

    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    grp: Mapped[str] = mapped_column(Text, primary_key=True)
    wave: Mapped[str] = mapped_column(String(63), primary_key=True)
    opens_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    closes_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    cls: Mapped[str] = mapped_column(String(10), primary_key=True)
    in_window: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    late: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    wd_ok: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RetentionWatermark(Base):
    """The latest enrolment, completion or withdrawal instant of a study's participants of one shard
    (never moves back); the study's watermark is the latest of its shards. Sharded as the counts
    are, so concurrent writers of a study do not all queue for one row
    (migration `retention_watermark_in_shards`)."""

    __tablename__ = "retention_watermarks"

    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("0"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
