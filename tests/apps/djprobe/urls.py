from django.urls import path

from djprobe import views

urlpatterns = [path("", views.hit)]
