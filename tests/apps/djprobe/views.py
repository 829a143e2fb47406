from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from djprobe.record import record


def hit(request: HttpRequest) -> JsonResponse:
    """Record this request; answer with the worker's pid and the session it used."""
    return JsonResponse(record(sleep=float(request.GET.get("sleep", "0"))))
