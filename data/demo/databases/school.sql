-- Demo database "school": teachers, the courses they teach, students and their enrollments.
CREATE TABLE teacher (
  teacher_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  subject TEXT,
  hire_year INTEGER,
  salary REAL
);
CREATE TABLE course (
  course_id INTEGER PRIMARY KEY,
  title TEXT NOT NULL,
  teacher_id INTEGER NOT NULL,
  room TEXT,
  credits INTEGER,
  FOREIGN KEY (teacher_id) REFERENCES teacher(teacher_id)
);
CREATE TABLE student (
  student_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  grade_level INTEGER,
  city TEXT,
  birth_date TEXT
);
CREATE TABLE enrollment (
  student_id INTEGER NOT NULL,
  course_id INTEGER NOT NULL,
  score INTEGER,
  PRIMARY KEY (student_id, course_id),
  FOREIGN KEY (student_id) REFERENCES student(student_id),
  FOREIGN KEY (course_id) REFERENCES course(course_id)
);
INSERT INTO teacher VALUES (1, 'Helen Park', 'Mathematics', 2008, 52000);
INSERT INTO teacher VALUES (2, 'David Osei', 'Physics', 2012, 49500);
INSERT INTO teacher VALUES (3, 'Laura Bianchi', 'History', 2005, 55000);
INSERT INTO teacher VALUES (4, 'Samuel Green', 'English', 2016, 46000);
INSERT INTO teacher VALUES (5, 'Mei Chen', 'Chemistry', 2010, 51000);
INSERT INTO teacher VALUES (6, 'Robert King', 'Mathematics', 2019, 44000);
INSERT INTO teacher VALUES (7, 'Fatima Zahra', 'Biology', 2014, 48500);
INSERT INTO teacher VALUES (8, 'Carlos Mendes', 'Music', 2021, 41000);
INSERT INTO teacher VALUES (9, 'Olga Ivanova', 'Art', 2023, 40000);
INSERT INTO course VALUES (1, 'Algebra I', 1, 'A101', 4);
INSERT INTO course VALUES (2, 'Geometry', 6, 'A102', 3);
INSERT INTO course VALUES (3, 'Mechanics', 2, 'B201', 4);
INSERT INTO course VALUES (4, 'World History', 3, 'C301', 3);
INSERT INTO course VALUES (5, 'Creative Writing', 4, 'C302', 2);
INSERT INTO course VALUES (6, 'Organic Chemistry', 5, 'B202', 4);
INSERT INTO course VALUES (7, 'Calculus', 1, 'A101', 5);
INSERT INTO course VALUES (8, 'Genetics', 7, 'B203', 3);
INSERT INTO course VALUES (9, 'Choir', 8, 'D401', 1);
INSERT INTO course VALUES (10, 'Ancient Rome', 3, 'C301', 2);
INSERT INTO course VALUES (11, 'Astronomy', 2, 'B201', 2);
INSERT INTO student VALUES (1, 'Alice Moreau', 10, 'Springfield', '2008-03-14');
INSERT INTO student VALUES (2, 'Ben Carter', 11, 'Riverton', '2007-07-22');
INSERT INTO student VALUES (3, 'Chloe Kim', 9, 'Springfield', '2009-01-30');
INSERT INTO student VALUES (4, 'Daniel Levi', 12, 'Lakeside', '2006-11-02');
INSERT INTO student VALUES (5, 'Ella Svensson', 10, 'Riverton', '2008-05-19');
INSERT INTO student VALUES (6, 'Farid Aziz', 11, 'Springfield', '2007-09-08');
INSERT INTO student VALUES (7, 'Gina Rossi', 9, 'Lakeside', '2009-12-25');
INSERT INTO student VALUES (8, 'Hugo Martin', 12, 'Springfield', '2006-04-11');
INSERT INTO student VALUES (9, 'Iris Nakamura', 10, 'Lakeside', '2008-08-03');
INSERT INTO student VALUES (10, 'Jack Wilson', 11, 'Riverton', '2007-02-27');
INSERT INTO student VALUES (11, 'Kara Jensen', 9, 'Springfield', '2009-06-16');
INSERT INTO student VALUES (12, 'Leo Dubois', 12, 'Riverton', '2006-10-05');
INSERT INTO student VALUES (13, 'Mila Horvat', 10, 'Hillcrest', '2008-02-09');
INSERT INTO student VALUES (14, 'Noah Fischer', 11, 'Hillcrest', '2007-12-01');
INSERT INTO enrollment VALUES (1, 1, 88);
INSERT INTO enrollment VALUES (1, 4, 92);
INSERT INTO enrollment VALUES (1, 5, 79);
INSERT INTO enrollment VALUES (2, 3, 71);
INSERT INTO enrollment VALUES (2, 7, 85);
INSERT INTO enrollment VALUES (2, 6, 64);
INSERT INTO enrollment VALUES (3, 1, 95);
INSERT INTO enrollment VALUES (3, 9, 90);
INSERT INTO enrollment VALUES (4, 7, 98);
INSERT INTO enrollment VALUES (4, 3, 91);
INSERT INTO enrollment VALUES (4, 8, 87);
INSERT INTO enrollment VALUES (5, 2, 58);
INSERT INTO enrollment VALUES (5, 4, 76);
INSERT INTO enrollment VALUES (6, 6, 82);
INSERT INTO enrollment VALUES (6, 8, 69);
INSERT INTO enrollment VALUES (6, 10, 93);
INSERT INTO enrollment VALUES (7, 1, 61);
INSERT INTO enrollment VALUES (7, 5, 84);
INSERT INTO enrollment VALUES (8, 7, 77);
INSERT INTO enrollment VALUES (8, 3, 66);
INSERT INTO enrollment VALUES (8, 4, 89);
INSERT INTO enrollment VALUES (9, 2, 94);
INSERT INTO enrollment VALUES (9, 9, 72);
INSERT INTO enrollment VALUES (10, 6, 55);
INSERT INTO enrollment VALUES (10, 10, 81);
INSERT INTO enrollment VALUES (11, 1, 73);
INSERT INTO enrollment VALUES (11, 5, 97);
INSERT INTO enrollment VALUES (12, 7, 83);
INSERT INTO enrollment VALUES (12, 8, 90);
INSERT INTO enrollment VALUES (12, 4, 68);
INSERT INTO enrollment VALUES (13, 2, 86);
INSERT INTO enrollment VALUES (13, 9, 97);
