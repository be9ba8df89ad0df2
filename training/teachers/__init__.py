"""Pretrained CGN teachers, used as black boxes: three functions of (u, y)."""
from training.teachers.cgn_mnist import TEACHERS, CGNMnist, TeacherError, load_teacher

__all__ = ["TEACHERS", "CGNMnist", "TeacherError", "load_teacher"]
