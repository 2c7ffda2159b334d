from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from app.core.crypto import settings_sealer
from app.core.db import DatabaseDep, SessionDep
from app.core.deps import SettingsDep
from app.core.routing import RoleRoute
from app.core.security import Analyst
from app.exports import service
from app.studies.deps import StudyFromPath

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["exports"], route_class=RoleRoute)

DatesQuery = Annotated[Literal["exact", "shifted", "year"] | None, Query(
    description="exact; shifted: every date and timestamp of a participant moved by the same number of days "
                "(per participant, between -180 and 180, never 0, the same in every export), so intervals are "
                "exact; year: years only. Default: the study's `export_dates`")]

@router.get(
    "/export", response_class=StreamingResponse,
    summary="De-identified data: item codes and derived variables, pseudonymous participants, no contact data",
    responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}},
)
def export(principal: Analyst, study: StudyFromPath, session: SessionDep, db: DatabaseDep, settings: SettingsDep,
           format: Annotated[Literal["csv", "parquet"], Query()] = "csv",
           layout: Annotated[Literal["long", "wide"], Query(description="long: per participant-wave; wide: "
                                                                          "per participant")] = "long",
           raw_cells: Annotated[bool, Query(description="CSV: write text answers exactly as stored. By default a "
                                                        "cell starting with = + - @ tab or CR gets a leading ' so "
                                                        "spreadsheets do not run it as a formula")] = False,
           dates: DatesQuery = None,
           ) -> StreamingResponse:
    export = service.export(session, db, study, settings_sealer(settings), format=format, layout=layout,
                            raw_cells=raw_cells, dates=dates)
    return StreamingResponse(export.body, media_type=export.media_type,
                             headers={"Content-Disposition": f'attachment; filename="{export.filename}"'})


@router.get("/export/dictionary", response_class=Response, summary="The data dictionary of the export (CSV)",
            responses={200: {"content": {"text/csv": {}}}})
def dictionary(principal: Analyst, study: StudyFromPath, session: SessionDep, settings: SettingsDep,
               dates: DatesQuery = None) -> Response:
    scope = service.scope_of(session, study, settings_sealer(settings), dates)
    return Response(service.dictionary_csv(study.require_codebook(), scope), media_type=service.MEDIA["csv"],
                    headers={"Content-Disposition": f'attachment; filename="{study.study.key}-dictionary.csv"'})
