DROP TABLE projects;
DROP FUNCTION mediaplane_touch_row();
