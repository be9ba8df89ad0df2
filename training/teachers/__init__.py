"""Pretrained CGN teachers, used as black boxes: three functions of (u, y)."""
from training.teachers.cgn_mnist import TEACHERS, CGNMnist, TeacherError, load_teacher, teacher_for_family

__all__ = ["TEACHERS", "CGNMnist", "TeacherError", "load_teacher", "teacher_for_family"]
